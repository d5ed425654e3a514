"""A tenant's server-side tools (toolexec: a built-in and a webhook) in voice sessions,
through the real gateway, toolexec and broker and the simulator's Realtime endpoint:
offered upstream beside the client's tools and hidden from the client, run by the
gateway, answered upstream, followed up; client tools in the same response; a
cancel during a tool run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from aiohttp import web

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import (
    RealtimeClient,
    assert_no_secret_leaks,
    realtime_upstream,
    reply_text,
)
from tests.e2e.tool_turns import calls, last_session, of_type, until_done
from tests.voice_support import chunks, silence, speech
from tools.redis_server import free_port
from tools.stack import Ports, Stack

KEY = new_key()
RECEIVER_PORT = free_port()
SECRET = "whsec-e2e-voice-0123456789abcdef"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TENANTS = """
allow_private_hosts: ["127.0.0.1"]
upstreams:{upstream}
tenants:
  caller:
    keys: ["{key}"]
    models:
      voice: {{upstream: realtime, upstream_model: gpt-realtime}}
    builtins: [calculate]
    webhooks:
      - name: hold_order
        description: Put an order on hold.
        parameters: {{type: object, properties: {{order_id: {{type: string}}}}}}
        url: http://127.0.0.1:{receiver}/hold
        secret_env: E2E_WEBHOOK_SECRET
        timeout_s: 20
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(
        TENANTS.format(
            upstream=realtime_upstream(ports.simulator),
            key=hash_key(KEY),
            receiver=RECEIVER_PORT,
        )
    )
    env = {"SWITCHBOARD_TENANTS_FILE": str(tenants), "E2E_WEBHOOK_SECRET": SECRET}
    with Stack(ports=ports, extra_env=env) as stack:
        yield stack
    assert_no_secret_leaks(stack)


class Receiver:
    """The tenant's webhook: holds each call until the test releases it."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hold", self.hold)
        self.runner = web.AppRunner(app)

    async def hold(self, request: web.Request) -> web.Response:
        arguments = await request.json()
        self.called.set()
        await self.release.wait()
        return web.json_response({"held": arguments["order_id"]})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.runner.setup()
    await web.TCPSite(receiver.runner, "127.0.0.1", RECEIVER_PORT).start()
    yield receiver
    receiver.release.set()
    await receiver.runner.cleanup()


@pytest.fixture
async def voice(stack: Stack) -> AsyncIterator[RealtimeClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{stack.websocket_url}?model=voice"
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        assert created["type"] == "session.created"
        # The client sees its own tools only: none yet.
        assert created["session"]["tools"] == []
        await client.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "output_modalities": ["text"], "tools": [WEATHER]},
            }
        )
        updated = (await client.recv_until("session.updated"))[-1]
        assert [tool["name"] for tool in updated["session"]["tools"]] == ["get_weather"]
        yield client


def outputs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function_call_output` items the client saw added."""
    return [
        event["item"]
        for event in of_type(events, "conversation.item.added")
        if event["item"]["type"] == "function_call_output"
    ]


async def test_a_server_tool_runs_in_a_voice_session_and_the_turn_goes_on(
    stack: Stack, voice: RealtimeClient
) -> None:
    await voice.say("what is 6*7? " + calls(("calculate", {"expression": "6*7"})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    first, second = of_type(events, "response.done")
    (call,) = first["response"]["output"]
    assert (call["type"], call["name"]) == ("function_call", "calculate")
    (output,) = outputs(events)
    assert output["call_id"] == call["call_id"]
    assert json.loads(output["output"]) == {"result": 42}
    assert second["response"]["status"] == "completed"
    assert reply_text(events).startswith('tool calculate returned {"result":42}')
    assert not of_type(events, "error")
    upstream = last_session(stack)
    # The upstream was offered the client's tool and the tenant's; the gateway
    # asked for the follow-up response.
    assert upstream["responses"][0]["tools"] == ["get_weather", "calculate", "hold_order"]
    assert upstream["client_events"]["response.create"] == 2


async def test_a_failed_server_tool_is_reported_to_the_client_and_the_model(
    voice: RealtimeClient,
) -> None:
    await voice.say("try it " + calls(("calculate", {"expression": 5})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    (error,) = of_type(events, "error")
    call = of_type(events, "response.done")[0]["response"]["output"][0]
    assert (error["error"]["code"], error["error"]["param"]) == (
        "tool_invalid_arguments",
        call["call_id"],
    )
    (output,) = outputs(events)
    assert json.loads(output["output"])["error"]["code"] == "tool_invalid_arguments"
    assert reply_text(events).startswith(f"tool calculate returned {output['output']}")


async def test_client_and_server_calls_in_one_response(stack: Stack, voice: RealtimeClient) -> None:
    text = "both " + calls(("get_weather", {"city": "Oslo"}), ("calculate", {"expression": "1+1"}))
    await voice.say(text)
    await voice.send({"type": "response.create"})
    events = await voice.recv_until("response.done", timeout_s=30)
    by_name = {o["name"]: o for o in events[-1]["response"]["output"]}
    # The gateway answers its call; the client answers its own and asks for more.
    events += await voice.recv_until("conversation.item.done")
    (output,) = outputs(events)
    assert output["call_id"] == by_name["calculate"]["call_id"]
    await voice.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "function_call_output",
                "call_id": by_name["get_weather"]["call_id"],
                "output": "sunny",
            },
        }
    )
    await voice.send({"type": "response.create"})
    events = await voice.recv_until("response.done", timeout_s=30)
    assert reply_text(events) == "tool get_weather returned sunny"
    assert not of_type(events, "error")
    assert last_session(stack)["client_events"]["response.create"] == 2


async def test_a_cancel_during_a_tool_run_keeps_its_output_and_asks_for_no_follow_up(
    stack: Stack, voice: RealtimeClient, receiver: Receiver
) -> None:
    await voice.say("hold it " + calls(("hold_order", {"order_id": "A-17"})))
    await voice.send({"type": "response.create"})
    events = await voice.recv_until("response.done", timeout_s=30)
    await asyncio.wait_for(receiver.called.wait(), 30)
    await voice.send({"type": "response.cancel"})
    receiver.release.set()
    events += await voice.recv_until("conversation.item.done", timeout_s=30)
    (output,) = outputs(events)
    assert json.loads(output["output"]) == {"held": "A-17"}
    # The user has the turn: the next response is the client's, about its message.
    await voice.say("never mind")
    later = await voice.respond()
    assert reply_text(later) == 'turn 2: you said "never mind".'
    assert not of_type(events + later, "error")
    assert last_session(stack)["client_events"]["response.create"] == 2


async def test_speech_during_a_tool_run_gives_the_user_the_turn(
    stack: Stack, voice: RealtimeClient, receiver: Receiver
) -> None:
    await voice.send(
        {"type": "session.update", "session": {"instructions": '[[sim {"transcript": "stop"}]]'}}
    )
    await voice.recv_until("session.updated")
    await voice.say("hold it " + calls(("hold_order", {"order_id": "B-2"})))
    await voice.send({"type": "response.create"})
    await voice.recv_until("response.done", timeout_s=30)
    await asyncio.wait_for(receiver.called.wait(), 30)
    for chunk in chunks(speech("stop") + silence(400)):
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
    events = await voice.recv_until("input_audio_buffer.speech_started")
    receiver.release.set()
    events += await voice.recv_until("input_audio_buffer.committed", timeout_s=30)
    # The upstream's VAD answers the user; the gateway asks for no follow-up.
    events += await voice.recv_until("response.done", timeout_s=30)
    while not outputs(events):
        events.append(await voice.recv())
    assert json.loads(outputs(events)[0]["output"]) == {"held": "B-2"}
    assert reply_text(events) == 'turn 2: you said "stop".'
    assert last_session(stack)["client_events"]["response.create"] == 1
