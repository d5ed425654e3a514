"""What `make smoke-deploy` asks of the running pods, from outside them.

Each check raises `SmokeFailure` with what it saw, and returns a line to print.
The model is the upstream simulator, steered by `[[sim ...]]` directives in the
user's text (docs/simulator.md).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

from openai import AsyncOpenAI
from openai.types.realtime import RealtimeConversationItemUserMessageParam

from tools.smoke_deploy.kube_play import Probe
from tools.stack import _grpc_serving


class SmokeFailure(Exception):
    """A check failed; the message says what was seen."""


def probe_passes(probe: Probe) -> bool:
    """One run of a readiness probe, as the kubelet would run it (here, on 127.0.0.1)."""
    if probe.kind == "httpGet":
        try:
            url = f"http://127.0.0.1:{probe.port}{probe.path}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= int(response.status) < 400
        except (urllib.error.URLError, OSError):
            return False
    if probe.kind == "grpc":
        # The same health check `make run` waits on.
        return _grpc_serving(f"127.0.0.1:{probe.port}")
    try:
        with socket.create_connection(("127.0.0.1", probe.port), timeout=2):
            return True
    except OSError:
        return False


def directive(**options: Any) -> str:
    return f"[[sim {json.dumps(options)}]]"


def message(text: str) -> RealtimeConversationItemUserMessageParam:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


class Talk:
    """The official `openai` SDK's realtime client against the gateway container."""

    def __init__(self, gateway_port: int, key: str) -> None:
        self.client = AsyncOpenAI(
            api_key=key, websocket_base_url=f"ws://127.0.0.1:{gateway_port}/v1"
        )

    async def conversation(self) -> str:
        async with self.client.realtime.connect(model="gpt-realtime") as connection:
            first = await asyncio.wait_for(connection.recv(), 10)
            if first.type != "session.created":
                raise SmokeFailure(f"first event {first.type}, not session.created")
            replies = []
            for text in ("Hello from the smoke test.", "And a second turn."):
                await connection.conversation.item.create(item=message(text))
                await connection.response.create()
                deltas, done = await _until_done(connection)
                if done.response.status != "completed":
                    raise SmokeFailure(f"response {done.response.status}: {done.response}")
                replies.append("".join(deltas))
        if not all(replies):
            raise SmokeFailure(f"empty replies: {replies}")
        return (
            f"conversation (openai SDK {_sdk_version()}): 2 turns completed, "
            f"replies of {len(replies[0])} and {len(replies[1])} characters"
        )

    async def tool_call(self) -> str:
        """The model calls `calculate`; toolexec runs it; the gateway goes on by itself."""
        call = {"tool_calls": [{"name": "calculate", "arguments": {"expression": "6*7"}}]}
        async with self.client.realtime.connect(model="gpt-realtime") as connection:
            await asyncio.wait_for(connection.recv(), 10)
            await connection.conversation.item.create(item=message("6*7? " + directive(**call)))
            await connection.response.create()
            _, first = await _until_done(connection)
            outputs = [o for o in first.response.output or [] if o.type == "function_call"]
            if [o.name for o in outputs] != ["calculate"]:
                raise SmokeFailure(f"no calculate call: {first.response.output}")
            # The gateway runs the tool and starts the next response without the client.
            deltas, second = await _until_done(connection)
        text = "".join(deltas)
        if second.response.status != "completed" or '{"result":42}' not in text:
            raise SmokeFailure(f"tool result not in the reply: {second.response.status} {text!r}")
        return f"tool call: calculate(6*7) ran in toolexec; the reply says {text[:44]!r}"

    async def stream_through_sigterm(
        self, stop_gateway: Callable[[], Coroutine[Any, Any, float]], grace_s: int
    ) -> tuple[str, float]:
        """A long response; SIGTERM to the gateway after its first delta. The drain lets
        it finish, then closes the socket with 1012 (reconnect and resume)."""
        slow = directive(tokens=120, token_delay_ms=40)
        async with self.client.realtime.connect(model="gpt-realtime") as connection:
            await asyncio.wait_for(connection.recv(), 10)
            await connection.conversation.item.create(item=message("a long one " + slow))
            await connection.response.create()
            deltas: list[str] = []
            stopping: asyncio.Task[float] | None = None
            started = time.monotonic()
            while True:
                event = await asyncio.wait_for(connection.recv(), 30)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                    if stopping is None:
                        stopping = asyncio.create_task(stop_gateway())
                elif event.type == "response.done":
                    break
            streamed_s = time.monotonic() - started
            status = event.response.status
            close_code = await _close_code(connection)
        if stopping is None:
            raise SmokeFailure("the response sent no delta")
        stopped_s = await stopping
        if status != "completed":
            raise SmokeFailure(f"the response ended {status} during the drain")
        if stopped_s > grace_s:
            raise SmokeFailure(f"the gateway took {stopped_s:.1f}s to stop (grace {grace_s}s)")
        return (
            f"SIGTERM to the gateway after the first delta: the response completed "
            f"({len(deltas)} deltas over {streamed_s:.1f}s), then close code {close_code}; "
            f"the container stopped in {stopped_s:.1f}s (grace {grace_s}s)"
        ), stopped_s


async def _until_done(connection: Any) -> tuple[list[str], Any]:
    deltas: list[str] = []
    while True:
        event = await asyncio.wait_for(connection.recv(), 30)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "error":
            raise SmokeFailure(f"error event: {event.error}")
        elif event.type == "response.done":
            return deltas, event


async def _close_code(connection: Any) -> int | str:
    """How the gateway closed the socket once the response was done (1012 on drain)."""
    try:
        while True:
            await asyncio.wait_for(connection.recv(), 15)
    except TimeoutError:
        return "none within 15 s"
    except Exception as closed:
        code = getattr(getattr(closed, "rcvd", None), "code", None)
        return code if code is not None else type(closed).__name__


def _sdk_version() -> str:
    import openai

    return str(openai.__version__)


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text exposition."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def metrics(ports: dict[str, int]) -> str:
    """Every service's /metrics answers, with the series the turns above must have moved."""
    expected = {
        "gateway": "switchboard_gateway_time_to_first_token_seconds_count",
        "broker": "switchboard_broker_upstream_requests_total",
        "toolexec": "switchboard_toolexec_calls_total",
        "session": "switchboard_session_rpcs_total",
    }
    seen = []
    for service, name in expected.items():
        value = sample(scrape(ports[service]), name)
        if value <= 0:
            raise SmokeFailure(f"{service} /metrics: {name} is {value}")
        seen.append(f"{name}={value:g}")
    return "metrics scraped from all four services: " + ", ".join(seen)
