"""A real webhook receiver for the tests: aiohttp on 127.0.0.1 that checks every signature.

Each route is one behaviour a webhook can have. Every request is recorded with
the result of `verify_signature` under the receiver's own secret; a request
whose signature does not verify is answered 401 and never reaches the route,
as a real receiver would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestServer

from switchboard.toolexec.signing import SIGNATURE_HEADER, verify_signature

SECRET = "whsec-test-0123456789abcdef"
HUGE_BYTES = 10 * 1024 * 1024
ERROR_BODY = "database exploded: " + "stack frame; " * 1000
LEAKY_HEADER = "X-Internal-Token"
LEAKY_VALUE = "internal-header-value-never-shown"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool


class Receiver:
    """The webhook receiver; start with `await start()`, stop with `await close()`."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.requests: list[Received] = []
        self.in_flight = 0
        # Set at close so handlers that wait forever end with the server.
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/echo", self._echo)
        app.router.add_post("/slow-echo", self._slow_echo)
        app.router.add_post("/fail", self._fail)
        app.router.add_post("/huge", self._huge)
        app.router.add_post("/huge-declared", self._huge_declared)
        app.router.add_post("/slow", self._slow)
        app.router.add_post("/text", self._text)
        app.router.add_post("/empty", self._empty)
        app.router.add_post("/redirect", self._redirect)
        app.router.add_post("/gzip", self._gzip)
        self._server = TestServer(app, host="127.0.0.1", port=0)

    async def start(self) -> None:
        await self._server.start_server()

    async def close(self) -> None:
        self._closing.set()
        await self._server.close()

    @property
    def port(self) -> int:
        port = self._server.port
        assert port is not None
        return port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    async def _checked(self, request: web.Request) -> tuple[bool, bytes]:
        body = await request.read()
        verified = verify_signature(self.secret, request.headers.get(SIGNATURE_HEADER), body)
        self.requests.append(Received(request.path, dict(request.headers), body, verified))
        return verified, body

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        verified, body = await self._checked(request)
        if not verified:
            return web.Response(status=401, text="bad signature")
        return web.json_response(
            {
                "echo": json.loads(body),
                "tenant": request.headers["X-Switchboard-Tenant"],
                "call_id": request.headers["X-Switchboard-Call-Id"],
                "tool": request.headers["X-Switchboard-Tool"],
            }
        )

    async def _slow_echo(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            await asyncio.sleep(0.3)
            return await self._echo(request)
        finally:
            self.in_flight -= 1

    async def _fail(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        return web.Response(status=500, text=ERROR_BODY, headers={LEAKY_HEADER: LEAKY_VALUE})

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        response = web.StreamResponse()  # chunked: no length announced
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(HUGE_BYTES // len(chunk)):
                await response.write(chunk)
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped reading at its cap and closed
        return response

    async def _huge_declared(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        return web.Response(body=b"y" * HUGE_BYTES, content_type="application/json")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=10)
        return web.json_response({"late": True})

    async def _text(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        return web.Response(text="plain words, not JSON")

    async def _empty(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        return web.Response(status=204)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        raise web.HTTPFound(location="/echo")

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        await self._checked(request)
        body = gzip.compress(json.dumps({"ok": True}).encode())
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )
