"""MCP tools in voice sessions: a tenant's registered MCP server (a real one, the `mcp`
SDK, its own process) offered in a voice session, listed by the gateway, declared
upstream as functions, called by the simulator's Realtime endpoint, run through
toolexec, shown to the client as `mcp_call` items, followed up; a failing tool and an
unreachable server; approvals; refusals."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import (
    RealtimeClient,
    assert_no_secret_leaks,
    realtime_upstream,
    reply_text,
)
from tests.e2e.tool_turns import calls, last_session, of_type, until_done
from tests.mcp_support import TOKEN, McpTestServer
from tests.voice_support import chunks, silence, speech
from tools.redis_server import free_port
from tools.stack import Ports, Stack

KEY = new_key()
DEAD_PORT = free_port()
SHOP = {"type": "mcp", "server_label": "shop", "require_approval": "never"}
TENANTS = """
allow_private_hosts: ["127.0.0.1"]
upstreams:{upstream}
tenants:
  caller:
    keys: ["{key}"]
    models:
      voice: {{upstream: realtime, upstream_model: gpt-realtime}}
    mcp_servers:
      shop:
        url: {url}
        headers_env: {{Authorization: VOICE_SHOP_MCP_AUTH}}
        allowed_tools: [lookup_order, add, fail, slow, echo]
        require_approval: [echo]
        timeout_s: 5
      gone:
        url: http://127.0.0.1:{dead}/mcp
        list_timeout_s: 2
"""


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mcp_server: McpTestServer) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(
        TENANTS.format(
            upstream=realtime_upstream(ports.simulator),
            key=hash_key(KEY),
            url=mcp_server.url,
            dead=DEAD_PORT,
        )
    )
    env = {"SWITCHBOARD_TENANTS_FILE": str(tenants), "VOICE_SHOP_MCP_AUTH": f"Bearer {TOKEN}"}
    with Stack(ports=ports, extra_env=env) as stack:
        yield stack
    assert_no_secret_leaks(stack)
    # Neither the server's credentials nor its URL are ever logged.
    mcp_server.assert_not_logged(stack.log_dir)


@pytest.fixture
async def voice(stack: Stack) -> AsyncIterator[RealtimeClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{stack.websocket_url}?model=voice"
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as connection:
        client = RealtimeClient(connection)
        assert (await client.recv())["type"] == "session.created"
        yield client


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


async def offer(client: RealtimeClient, *tools: dict[str, Any]) -> list[dict[str, Any]]:
    """`session.update` with `tools` (text replies); the events up to its `session.updated`."""
    session = {"type": "realtime", "output_modalities": ["text"], "tools": list(tools)}
    await client.send({"type": "session.update", "session": session})
    return await client.recv_until("session.updated", timeout_s=30)


async def test_a_voice_turn_calls_an_mcp_tool_and_the_model_speaks_of_its_result(
    stack: Stack, voice: RealtimeClient
) -> None:
    events = await offer(voice, SHOP)
    # The listing, as in text sessions; then the session's echo shows the mcp tool.
    assert kinds(events) == [
        "conversation.item.added",
        "mcp_list_tools.in_progress",
        "mcp_list_tools.completed",
        "conversation.item.done",
        "session.updated",
    ]
    listing = events[3]["item"]
    assert listing["type"] == "mcp_list_tools" and listing["server_label"] == "shop"
    assert [tool["name"] for tool in listing["tools"]] == [
        "add",
        "echo",
        "fail",
        "lookup_order",
        "slow",
    ]
    assert events[-1]["session"]["tools"] == [SHOP]
    for event in events:
        assert event["event_id"].startswith("event_v"), event

    await voice.say("Where is order ord_7? " + calls(("shop__lookup_order", {"order_id": "ord_7"})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    first = events.index(of_type(events, "response.done")[0])
    assert [k for k in kinds(events[: first + 1]) if "mcp" in k or "output_item" in k] == [
        "response.output_item.added",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_item.done",
    ]
    added = of_type(events, "response.output_item.added")[0]["item"]
    assert (added["type"], added["server_label"], added["name"]) == (
        "mcp_call",
        "shop",
        "lookup_order",
    )
    done = of_type(events, "response.done")[0]["response"]
    assert done["status"] == "completed"
    (item,) = done["output"]
    assert item["type"] == "mcp_call" and item["id"] == added["id"]
    assert json.loads(item["arguments"]) == {"order_id": "ord_7"}
    # The real server's answer: the call ran.
    assert json.loads(item["output"]) == {"order_id": "ord_7", "status": "shipped"}
    assert item["error"] is None
    assert of_type(events, "response.output_item.done")[0]["item"] == item
    # No function call, and not the gateway's answer upstream, reaches the client.
    for event in events:
        assert "function_call" not in json.dumps(event.get("item") or {}), event
        assert not event["type"].startswith("response.function_call"), event
    # The follow-up response: the model read the tool's result.
    assert reply_text(events) == (
        'tool shop__lookup_order returned {"order_id":"ord_7","status":"shipped"}'
    )
    assert not of_type(events, "error")
    upstream = last_session(stack)
    # The upstream was offered functions for the listed tools and never the server;
    # the gateway asked for the follow-up.
    assert upstream["responses"][0]["tools"] == [
        "shop__add",
        "shop__echo",
        "shop__fail",
        "shop__lookup_order",
        "shop__slow",
    ]
    assert upstream["client_events"]["response.create"] == 2


async def test_a_failing_mcp_tool_ends_its_call_failed_and_the_session_goes_on(
    voice: RealtimeClient,
) -> None:
    await offer(voice, SHOP)
    await voice.say("fail please " + calls(("shop__fail", {})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    assert of_type(events, "response.mcp_call.failed")
    assert not of_type(events, "response.mcp_call.completed")
    item = of_type(events, "response.output_item.done")[0]["item"]
    assert item["type"] == "mcp_call" and item["output"] is None
    assert item["error"]["type"] == "tool_execution_error"
    assert item["error"]["message"].startswith("The tool 'fail' of MCP server 'shop' failed:")
    assert reply_text(events).startswith('tool shop__fail returned {"error":')
    # The session goes on.
    await voice.say("and now? " + calls(("shop__add", {"a": 2, "b": 3})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    assert of_type(events, "response.done")[0]["response"]["output"][0]["output"] == '{"result":5}'
    assert reply_text(events) == 'tool shop__add returned {"result":5}'


async def test_an_unreachable_mcp_server_fails_its_listing_and_the_session_goes_on(
    voice: RealtimeClient,
) -> None:
    gone = {"type": "mcp", "server_label": "gone", "require_approval": "never"}
    events = await offer(voice, gone, SHOP)
    assert "mcp_list_tools.failed" in kinds(events)
    (error,) = of_type(events, "error")
    assert error["error"]["code"] == "mcp_list_tools_failed"
    assert "127.0.0.1" not in error["error"]["message"]
    assert "mcp_list_tools.completed" in kinds(events)  # shop's
    assert events[-1]["session"]["tools"] == [gone, SHOP]
    await voice.say("add " + calls(("shop__add", {"a": 1, "b": 1})))
    await voice.send({"type": "response.create"})
    events = await until_done(voice, 2)
    # The failed listing is tried again before the response.
    assert kinds(events)[:3] == [
        "conversation.item.added",
        "mcp_list_tools.in_progress",
        "mcp_list_tools.failed",
    ]
    assert of_type(events, "error")[0]["error"]["code"] == "mcp_list_tools_failed"
    assert reply_text(events) == 'tool shop__add returned {"result":2}'


async def test_an_ephemeral_secrets_mcp_tool_is_listed_when_the_session_opens(
    stack: Stack,
) -> None:
    minted = await asyncio.to_thread(
        post_json,
        f"http://127.0.0.1:{stack.ports.gateway}/v1/realtime/client_secrets",
        {"session": {"type": "realtime", "model": "voice", "tools": [SHOP]}},
    )
    headers = {"Authorization": f"Bearer {minted['value']}"}
    url = f"{stack.websocket_url}?model=voice"
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as connection:
        voice = RealtimeClient(connection)
        created = await voice.recv()
        assert created["type"] == "session.created"
        assert created["session"]["tools"] == [SHOP]
        events = await voice.recv_until("session.updated", timeout_s=30)
        assert kinds(events)[:3] == [
            "conversation.item.added",
            "mcp_list_tools.in_progress",
            "mcp_list_tools.completed",
        ]
        assert events[-1]["session"]["tools"] == [SHOP]
        await voice.send({"type": "session.update", "session": {"output_modalities": ["text"]}})
        await voice.recv_until("session.updated")
        await voice.say("look " + calls(("shop__lookup_order", {"order_id": "ord_1"})))
        await voice.send({"type": "response.create"})
        events = await until_done(voice, 2)
        assert of_type(events, "response.mcp_call.completed")
        assert reply_text(events).startswith("tool shop__lookup_order returned")
    assert last_session(stack)["responses"][0]["tools"] == [
        "shop__add",
        "shop__echo",
        "shop__fail",
        "shop__lookup_order",
        "shop__slow",
    ]


async def test_a_cancel_during_an_mcp_call_keeps_its_result_and_asks_for_no_follow_up(
    stack: Stack, voice: RealtimeClient
) -> None:
    await offer(voice, SHOP)
    await voice.say("wait " + calls(("shop__slow", {"seconds": 1.5})))
    await voice.send({"type": "response.create"})
    events = await voice.recv_until("response.mcp_call.in_progress", timeout_s=30)
    assert not of_type(events, "response.done")  # held until the call ran
    await voice.send({"type": "response.cancel"})
    events = await voice.recv_until("response.done", timeout_s=30)
    assert kinds(events)[:2] == ["response.mcp_call.completed", "response.output_item.done"]
    (item,) = events[-1]["response"]["output"]
    assert (item["type"], item["output"]) == ("mcp_call", '{"result":"done"}')
    # The user has the turn: the next response is the client's, about its message.
    await voice.say("never mind")
    later = await voice.respond()
    assert reply_text(later) == 'turn 2: you said "never mind".'
    assert not of_type(events + later, "error")
    assert last_session(stack)["client_events"]["response.create"] == 2


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        minted: dict[str, Any] = orjson.loads(answer.read())
        return minted


async def test_a_call_needing_approval_runs_once_approved_in_the_next_response(
    stack: Stack, voice: RealtimeClient
) -> None:
    # The tenant wants `echo` approved; the client asks for no other approvals.
    await offer(voice, SHOP)
    await voice.say("say it " + calls(("shop__echo", {"text": "hello there"})))
    events = await voice.respond()
    (request,) = events[-1]["response"]["output"]
    assert (request["type"], request["server_label"], request["name"]) == (
        "mcp_approval_request",
        "shop",
        "echo",
    )
    assert json.loads(request["arguments"]) == {"text": "hello there"}
    assert of_type(events, "response.output_item.done")[0]["item"] == request
    assert not [k for k in kinds(events) if k.startswith("response.mcp_call")]
    # Not run, and no follow-up: the client answers.
    await voice.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "mcp_approval_response",
                "approval_request_id": request["id"],
                "approve": True,
            },
        }
    )
    added = (await voice.recv_until("conversation.item.done"))[-1]["item"]
    assert (added["type"], added["approval_request_id"], added["approve"]) == (
        "mcp_approval_response",
        request["id"],
        True,
    )
    events = await voice.respond()
    assert [k for k in kinds(events) if "mcp" in k or "output_item" in k][:5] == [
        "response.output_item.added",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_item.added",
    ]
    call, message = events[-1]["response"]["output"]
    assert (call["type"], call["approval_request_id"], call["output"]) == (
        "mcp_call",
        request["id"],
        '{"result":"hello there"}',
    )
    assert message["type"] == "message"
    indices = [e["output_index"] for e in of_type(events, "response.output_item.added")]
    assert indices == [0, 1]
    assert reply_text(events) == 'tool shop__echo returned {"result":"hello there"}'
    assert last_session(stack)["client_events"]["response.create"] == 2
    # An approval request is acted on once.
    await voice.send(
        {
            "type": "conversation.item.create",
            "event_id": "ev_again",
            "item": {
                "type": "mcp_approval_response",
                "approval_request_id": request["id"],
                "approve": True,
            },
        }
    )
    error = await voice.recv()
    assert (error["type"], error["error"]["code"]) == ("error", "item_not_found")
    assert error["error"]["event_id"] == "ev_again"


async def test_a_denied_call_is_not_run_and_the_model_reads_why(voice: RealtimeClient) -> None:
    await offer(voice, {"type": "mcp", "server_label": "shop"})  # approve every call
    await voice.say("add " + calls(("shop__add", {"a": 1, "b": 2})))
    events = await voice.respond()
    (request,) = events[-1]["response"]["output"]
    assert request["type"] == "mcp_approval_request"
    answer = {
        "type": "mcp_approval_response",
        "approval_request_id": request["id"],
        "approve": False,
        "reason": "not now",
    }
    await voice.send({"type": "conversation.item.create", "item": answer})
    await voice.recv_until("conversation.item.done")
    events = await voice.respond()
    assert "response.mcp_call.failed" in kinds(events)
    assert "response.mcp_call.in_progress" not in kinds(events)
    call = events[-1]["response"]["output"][0]
    assert call["output"] is None
    assert call["error"]["message"] == (
        "The user did not approve this call, so it was not made. Reason given: not now"
    )
    assert reply_text(events).startswith('tool shop__add returned {"error":')


@pytest.mark.parametrize(
    ("tool", "code", "param"),
    [
        (
            {"type": "mcp", "server_label": "elsewhere", "require_approval": "never"},
            "mcp_server_not_registered",
            "session.tools[1].server_label",
        ),
        (
            {**SHOP, "headers": {"Authorization": "Bearer x"}},
            "unsupported_feature",
            "session.tools[1].headers",
        ),
    ],
)
async def test_refused_mcp_tools(
    voice: RealtimeClient, tool: dict[str, Any], code: str, param: str
) -> None:
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    await voice.send(
        {"type": "session.update", "event_id": "ev1", "session": {"tools": [weather, tool]}}
    )
    error = await voice.recv()
    assert error["type"] == "error"
    assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    assert error["error"]["event_id"] == "ev1"
    # Refused before anything went upstream or was listed; the session goes on.
    await voice.say("hello")
    events = await voice.respond()
    assert events[-1]["response"]["status"] == "completed"
    assert not of_type(events, "error")


async def test_speech_during_an_mcp_call_waits_for_it_and_gives_the_user_the_turn(
    stack: Stack, voice: RealtimeClient
) -> None:
    instructions = '[[sim {"transcript": "stop"}]]'
    await voice.send({"type": "session.update", "session": {"instructions": instructions}})
    await voice.recv_until("session.updated")
    await offer(voice, SHOP)
    await voice.say("wait " + calls(("shop__slow", {"seconds": 2})))
    await voice.send({"type": "response.create"})
    await voice.recv_until("response.mcp_call.in_progress", timeout_s=30)
    for chunk in chunks(speech("stop") + silence(400)):
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
    # The upstream heard the user meanwhile; its events come after the call's end.
    events = await voice.recv_until("input_audio_buffer.speech_started", timeout_s=30)
    assert kinds(events).index("response.mcp_call.completed") < kinds(events).index("response.done")
    # The upstream's VAD answers the user; the gateway asks for no follow-up.
    events = await voice.recv_until("response.done", timeout_s=30)
    assert reply_text(events) == 'turn 2: you said "stop".'
    assert last_session(stack)["client_events"]["response.create"] == 1
