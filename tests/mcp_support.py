"""A real MCP server for the tests, built with the official `mcp` SDK.

`McpTestServer` runs it as a process of its own (`python -m tests.mcp_support`)
on a random port, so a test can kill it in the middle of a call. It serves
streamable HTTP at `/mcp` and refuses (401) any request without the bearer
token it was started with, which shows the configured headers are sent.

Tools: `add(a, b)`, `echo(text)`, `lookup_order(order_id)` (structured
result), `fail()` (the tool reports an error), `slow(seconds)`, `big(size)`
(a result of `size` characters), `die()` (the process exits mid-call).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "mcp-test-token-0f3c9a"


class McpTestServer:
    """The test MCP server process. Use as a context manager; `url` is its endpoint."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def __enter__(self) -> McpTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = {**os.environ, "MCP_TEST_TOKEN": self.token, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.mcp_support"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError("the MCP test server did not start")
        self.port = int(line.split()[1])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the MCP test server does not accept connections")

    def assert_not_logged(self, log_dir: Path) -> None:
        """Fail when a service log in `log_dir` holds the server's token or URL."""
        for log in log_dir.glob("*.log"):
            text = log.read_text(errors="replace")
            assert self.token not in text, log.name
            assert self.url not in text, log.name

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _app() -> Any:
    from mcp.server.mcpserver import MCPServer
    from starlette.responses import PlainTextResponse

    server = MCPServer("switchboard-test")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Say the text back."""
        return text

    @server.tool()
    def lookup_order(order_id: str) -> dict[str, str]:
        """Look up an order's status by its id."""
        return {"order_id": order_id, "status": "shipped"}

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("the warehouse is closed")

    @server.tool()
    async def slow(seconds: float) -> str:
        """Wait, then answer."""
        await asyncio.sleep(seconds)
        return "done"

    @server.tool()
    def big(size: int) -> str:
        """A long answer."""
        return "x" * size

    @server.tool()
    def die() -> str:
        """The server goes away in the middle of the call."""
        os._exit(1)

    inner = server.streamable_http_app(stateless_http=True, json_response=True)
    token = os.environ.get("MCP_TEST_TOKEN", "")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"").decode() != f"Bearer {token}":
                await PlainTextResponse("no token", status_code=401)(scope, receive, send)
                return
        await inner(scope, receive, send)

    # The inner app's lifespan runs the SDK's session manager.
    app_with_lifespan: Any = app
    return app_with_lifespan, inner


def main() -> None:
    import uvicorn

    app, inner = _app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"port {sock.getsockname()[1]}", flush=True)

    async def serve() -> None:
        async with inner.router.lifespan_context(inner):
            config = uvicorn.Config(app, log_level="critical", lifespan="off")
            await uvicorn.Server(config).serve(sockets=[sock])

    asyncio.run(serve())


if __name__ == "__main__":
    main()
