"""Function calls end to end: client-side tools (the client runs them) and server-side
tools (toolexec runs them and the gateway continues the turn by itself)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from openai import AsyncOpenAI

from tests.e2e.conftest import RealtimeClient, reply_text
from tools.stack import Stack


def directive(**options: Any) -> str:
    return f"[[sim {orjson.dumps(options).decode()}]]"


def calls(*specs: tuple[str, dict[str, Any]]) -> str:
    return directive(tool_calls=[{"name": n, "arguments": a} for n, a in specs])


async def until_done(client: RealtimeClient, responses: int) -> list[dict[str, Any]]:
    """Every event up to the `responses`-th `response.done`."""
    events: list[dict[str, Any]] = []
    while responses:
        events += await client.recv_until("response.done", timeout_s=30)
        responses -= 1
    return events


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == event_type]


async def test_client_side_tool_round_trip_with_the_official_sdk(stack: Stack) -> None:
    client = AsyncOpenAI(
        api_key=stack.dev_key, websocket_base_url=f"ws://127.0.0.1:{stack.ports.gateway}/v1"
    )
    weather_tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    async with client.realtime.connect(model="gpt-realtime") as connection:
        await connection.recv()
        await connection.session.update(session={"type": "realtime", "tools": [weather_tool]})
        assert (await connection.recv()).type == "session.updated"
        text = "weather in Paris? " + calls(("get_weather", {"city": "Paris"}))
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        )
        await connection.response.create()
        events = []
        async for event in connection:
            events.append(event)
            if event.type == "response.done":
                break
        done = events[-1].response
        assert done.status == "completed"
        (call,) = [o for o in done.output if o.type == "function_call"]
        assert call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        deltas = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        assert deltas == call.arguments
        # The gateway runs nothing: the client answers the call itself.
        await connection.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": '{"c": 21}'}
        )
        await connection.response.create()
        text_events = []
        async for event in connection:
            text_events.append(event)
            if event.type == "response.done":
                break
        reply = "".join(e.delta for e in text_events if e.type == "response.output_text.delta")
        assert reply.startswith('tool get_weather returned {"c": 21}')
    await client.close()


async def test_server_side_tool_runs_without_the_client(client: RealtimeClient) -> None:
    await client.say("what is 6*7? " + calls(("calculate", {"expression": "6*7"})))
    await client.send({"type": "response.create"})
    events = await until_done(client, 2)
    first, second = of_type(events, "response.done")
    assert [o["type"] for o in first["response"]["output"]] == ["function_call"]
    outputs = [
        e["item"]
        for e in of_type(events, "conversation.item.added")
        if e["item"]["type"] == "function_call_output"
    ]
    assert [json.loads(o["output"]) for o in outputs] == [{"result": 42}]
    assert outputs[0]["call_id"] == first["response"]["output"][0]["call_id"]
    assert second["response"]["status"] == "completed"
    assert reply_text(events).startswith('tool calculate returned {"result":42}')
    assert not of_type(events, "error")
    # The next turn sees the whole tool exchange in its context.
    await client.say("thanks " + directive(echo_context=True))
    later = reply_text(await client.respond())
    # user, function_call, function_call_output, assistant, user
    assert "context=5" in later


async def test_two_parallel_calls_both_run(client: RealtimeClient) -> None:
    await client.say(
        "two things "
        + calls(("calculate", {"expression": "2**10"}), ("current_time", {"timezone": "UTC"}))
    )
    await client.send({"type": "response.create"})
    events = await until_done(client, 2)
    first = of_type(events, "response.done")[0]["response"]
    assert sorted(o["name"] for o in first["output"]) == ["calculate", "current_time"]
    outputs = {
        e["item"]["call_id"]: json.loads(e["item"]["output"])
        for e in of_type(events, "conversation.item.added")
        if e["item"]["type"] == "function_call_output"
    }
    by_name = {o["name"]: outputs[o["call_id"]] for o in first["output"]}
    assert by_name["calculate"] == {"result": 1024}
    assert by_name["current_time"]["timezone"] == "UTC"


async def test_tool_errors_reach_the_model_and_the_client(client: RealtimeClient) -> None:
    cases = [
        ("calculate", {"expression": 5}, "tool_invalid_arguments"),
        ("teleport", {}, "tool_not_found"),
    ]
    for name, arguments, code in cases:
        await client.say(f"try {name} " + calls((name, arguments)))
        await client.send({"type": "response.create"})
        events = await until_done(client, 2)
        errors = of_type(events, "error")
        assert [e["error"]["code"] for e in errors] == [code], name
        output = next(
            e["item"]["output"]
            for e in of_type(events, "conversation.item.added")
            if e["item"]["type"] == "function_call_output"
        )
        assert json.loads(output)["error"]["code"] == code
        # The model got the error as the tool's output and answered in text.
        assert reply_text(events).startswith(f"tool {name} returned {output}")
        assert of_type(events, "response.done")[-1]["response"]["status"] == "completed"


async def test_a_tool_loop_stops_after_the_round_limit(client: RealtimeClient) -> None:
    await client.say("spin " + directive(tool_calls=[{"name": "current_time"}], tool_loop=True))
    await client.send({"type": "response.create"})
    events = []
    while True:
        event = await client.recv(timeout_s=30)
        events.append(event)
        if event["type"] == "error":
            break
    assert event["error"]["code"] == "tool_rounds_exceeded"
    # The default limit: 8 rounds run tools, the 9th response's calls do not.
    assert len(of_type(events, "response.done")) == 9
    outputs = [
        e
        for e in of_type(events, "conversation.item.added")
        if e["item"]["type"] == "function_call_output"
    ]
    assert len(outputs) == 8
    # The conversation goes on.
    await client.say("are you there?")
    assert (await client.respond())[-1]["response"]["status"] == "completed"
