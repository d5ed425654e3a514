"""End-to-end fixtures: the real processes, started by the same launcher as `make run`."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tools.otlp_receiver import OtlpReceiver, ReceivedSpan
from tools.stack import SIMULATOR_KEY, Ports, Stack


@pytest.fixture(scope="session", autouse=True)
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """One real OTLP receiver for the whole end-to-end run, and every stack exporting to it.

    The variables are set for the run (stacks inherit the test process's
    environment), so every span of every stack a test starts arrives here; when
    the run ends, after the last stack has stopped and flushed, they are all
    scanned for key and secret material.
    """
    with OtlpReceiver() as receiver, pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        yield receiver
        leaks = span_leaks(receiver.spans())
    assert not leaks, f"secret material in spans: {leaks}"


@pytest.fixture(scope="session")
def stack(otlp_receiver: OtlpReceiver) -> Iterator[Stack]:
    """Redis, the simulator and the four services, on free ports, once per test run.

    Redis keeps an append-only file so a test can kill and restart it without
    losing the sessions other tests hold (as a production Redis would). It
    exports its spans to `otlp_receiver`, which outlives it.
    """
    stack = Stack(
        ports=Ports.free(),
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "12"],
        redis_args=("--appendonly", "yes", "--appendfsync", "always"),
        extra_env={"SWITCHBOARD_GATEWAY_HANDSHAKE_TIMEOUT_S": "2"},
    )
    with stack:
        yield stack
    assert_no_secret_leaks(stack)


# Credential shapes Switchboard handles: tenant keys, ephemeral secrets, the
# upstream key the launcher gives the broker, webhook signing secrets.
SECRET_PATTERNS = (
    re.compile(r"sk-sb-[A-Za-z0-9_-]{16,}"),
    re.compile(r"ek_[A-Za-z0-9_-]{16,}"),
    re.compile(re.escape(SIMULATOR_KEY)),
    re.compile(r"whsec[-_][A-Za-z0-9_-]{16,}"),
)


def assert_no_secret_leaks(stack: Stack) -> None:
    """Fail when a line of a service log of `stack` holds key or secret material."""
    leaks = secret_leaks(stack)
    assert not leaks, f"secret material in service logs: {leaks}"


def secret_leaks(stack: Stack) -> list[str]:
    """Every line of every service log that holds key or secret material."""
    leaks = []
    for path in sorted(stack.log_dir.glob("*.log")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if stack.dev_key in line or any(p.search(line) for p in SECRET_PATTERNS):
                leaks.append(f"{path.name}:{number}: {line[:200]}")
    assert any(stack.log_dir.glob("*.log")), "no service logs to scan"
    return leaks


def span_leaks(spans: list[ReceivedSpan]) -> list[str]:
    """Every span holding key or secret material in any field (name, attributes,
    events, links, status, resource), named by service, span name and the match."""
    leaks = []
    for span in spans:
        for pattern in SECRET_PATTERNS:
            found = pattern.search(span.text)
            if found:
                leaks.append(f"{span.service} {span.name!r}: {found.group()[:12]}...")
    return leaks


class RealtimeClient:
    """A raw WebSocket client of the Realtime protocol, for what SDKs won't send."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, event: dict[str, Any]) -> None:
        await self.connection.send(orjson.dumps(event).decode())

    async def recv(self, timeout_s: float = 10.0) -> dict[str, Any]:
        import asyncio

        frame = await asyncio.wait_for(self.connection.recv(), timeout_s)
        event: dict[str, Any] = orjson.loads(frame)
        return event

    async def recv_until(self, event_type: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """All events up to and including the first of `event_type`."""
        events = []
        while True:
            event = await self.recv(timeout_s)
            events.append(event)
            if event["type"] == event_type:
                return events

    async def say(self, text: str) -> dict[str, Any]:
        await self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        return (await self.recv_until("conversation.item.done"))[-1]

    async def respond(self) -> list[dict[str, Any]]:
        await self.send({"type": "response.create"})
        return await self.recv_until("response.done", timeout_s=30)


def tenants_file(directory: Path, ports: Ports, tenants: str, *, preamble: str = "") -> Path:
    """A tenants file whose `default` upstream is the stack's simulator.

    Args:
        tenants: the YAML under `tenants:`, each tenant indented by two spaces.
        preamble: top-level YAML before it (e.g. `allow_private_hosts`).
    """
    path = directory / "tenants.yaml"
    path.write_text(
        f"""{preamble}
upstreams:
  default:
    base_url: http://127.0.0.1:{ports.simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
tenants:
{tenants}"""
    )
    return path


NPM_CLIENTS = Path(__file__).parent.parent / "npm"


def run_node(script: str, env: dict[str, str]) -> Any:
    """Run a Node script of tests/npm with only `env` (and a PATH); what it printed
    last, as JSON. Fails with its stderr when it exits non-zero."""
    run = subprocess.run(
        ["node", str(NPM_CLIENTS / script)],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return orjson.loads(run.stdout.strip().splitlines()[-1])


def realtime_upstream(simulator_port: int) -> str:
    """The YAML of an `upstreams:` entry `realtime`: the simulator's Realtime endpoint."""
    return f"""
  realtime:
    kind: realtime
    base_url: http://127.0.0.1:{simulator_port}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY"""


def connect(stack: Stack, *, key: str | None = None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key if key is not None else stack.dev_key}"}
    return websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime", additional_headers=headers, **kwargs
    )


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[RealtimeClient]:
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        assert created["type"] == "session.created"
        yield client


def reply_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
