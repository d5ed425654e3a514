"""A tenant's webhook tools through the whole system: the model calls them, toolexec
POSTs signed requests to a receiver on 127.0.0.1, and the turn goes on by itself,
whatever the webhook does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from aiohttp import web

from switchboard.tenancy import hash_key, new_key
from switchboard.toolexec.signing import SIGNATURE_HEADER, verify_signature
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tools.redis_server import free_port
from tools.stack import Ports, Stack

KEY = new_key()
SECRET = "whsec-e2e-0123456789abcdef"
RECEIVER_PORT = free_port()


def hook(name: str, path: str, host: str = "127.0.0.1", timeout_s: float = 5) -> str:
    return f"""
      - name: {name}
        description: {name}
        parameters: {{type: object, properties: {{order_id: {{type: string}}}}}}
        url: http://{host}:{RECEIVER_PORT}{path}
        secret_env: E2E_WEBHOOK_SECRET
        timeout_s: {timeout_s}"""


TENANTS = f"""
  shop:
    keys: ["{hash_key(KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    builtins: []
    webhooks:{hook("lookup_order", "/echo")}{hook("broken", "/fail")}{hook("flood", "/huge")}
{hook("sleepy", "/slow", timeout_s=0.5)}{hook("internal", "/x", host="10.0.0.5")}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(
        tmp_path_factory.mktemp("tenants"),
        ports,
        TENANTS,
        preamble='allow_private_hosts: ["127.0.0.1"]',
    )
    env = {"SWITCHBOARD_TENANTS_FILE": str(path), "E2E_WEBHOOK_SECRET": SECRET}
    with Stack(ports=ports, extra_env=env) as stack:
        yield stack


class Receiver:
    """The tenant's webhook server: verifies every signature, records each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/fail", self.fail)
        app.router.add_post("/huge", self.huge)
        app.router.add_post("/slow", self.slow)
        self.runner = web.AppRunner(app)

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        verified = verify_signature(SECRET, request.headers.get(SIGNATURE_HEADER, ""), body)
        call = {"path": request.path, "verified": verified, "arguments": json.loads(body)}
        call["call_id"] = request.headers.get("X-Switchboard-Call-Id")
        self.calls.append(call)
        return call

    async def echo(self, request: web.Request) -> web.Response:
        call = await self._record(request)
        if not call["verified"]:
            return web.json_response({"error": "bad signature"}, status=401)
        return web.json_response({"order": call["arguments"]["order_id"], "status": "shipped"})

    async def fail(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=500, text="database exploded")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(160):  # 10 MiB
            await response.write(b"x" * 65536)
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(5)
        return web.json_response({})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.runner.setup()
    site = web.TCPSite(receiver.runner, "127.0.0.1", RECEIVER_PORT)
    await site.start()
    yield receiver
    await receiver.runner.cleanup()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[RealtimeClient]:
    async with websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {KEY}"},
    ) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        yield client


async def call_tool(client: RealtimeClient, name: str) -> tuple[Any, list[dict[str, Any]]]:
    """Ask the model to call `name`; the tool's output and the whole turn's events."""
    call = {"name": name, "arguments": {"order_id": "A-17"}}
    await client.say(f"use {name} [[sim {json.dumps({'tool_calls': [call]})}]]")
    await client.send({"type": "response.create"})
    events = await client.recv_until("response.done", timeout_s=30)
    events += await client.recv_until("response.done", timeout_s=30)
    output = next(
        e["item"]["output"]
        for e in events
        if e["type"] == "conversation.item.added" and e["item"]["type"] == "function_call_output"
    )
    return json.loads(output), events


async def test_a_signed_webhook_runs_without_the_client(
    client: RealtimeClient, receiver: Receiver
) -> None:
    output, events = await call_tool(client, "lookup_order")
    assert output == {"order": "A-17", "status": "shipped"}
    (call,) = receiver.calls
    assert call["verified"] is True
    assert call["arguments"] == {"order_id": "A-17"}
    assert reply_text(events).startswith('tool lookup_order returned {"order":"A-17"')
    assert events[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize(
    ("tool", "code", "words"),
    [
        ("broken", "tool_execution_failed", "500"),
        ("flood", "tool_execution_failed", "larger than"),
        ("sleepy", "tool_timeout", ""),
        ("internal", "tool_execution_failed", "private"),
    ],
)
async def test_failing_webhooks_give_specific_errors_and_the_turn_goes_on(
    client: RealtimeClient, receiver: Receiver, tool: str, code: str, words: str
) -> None:
    output, events = await call_tool(client, tool)
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == [code]
    assert words in errors[0]["message"]
    assert output["error"]["code"] == code
    # The model answered with the error as the tool's output; the conversation goes on.
    assert events[-1]["response"]["status"] == "completed"
    assert reply_text(events).startswith(f"tool {tool} returned")
    await client.say("and now?")
    assert (await client.respond())[-1]["response"]["status"] == "completed"
    if tool == "internal":
        assert receiver.calls == []  # refused before any connection
