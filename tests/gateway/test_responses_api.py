"""`POST /v1/responses` in-process: the real app over the in-memory backends, the
official `openai` SDK's `responses.create(stream=True)`, its `responses.stream()`
helper (which rebuilds the response from the events and checks their order),
and a raw client for the event names and ids."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from switchboard.gateway.testing import canned_tool, reply
from switchboard.gateway.testing.model import Call, Fail, Finish, Script, Text
from tests.gateway.test_app import Gateway
from tests.gateway.test_chat_completions import post

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def test_the_sdk_streams_semantic_events(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    gateway.backends.model.queue(reply("Hello", " there."))
    stream = await sdk.responses.create(
        model="gpt-4o-mini", input="Hi!", instructions="Be brief.", stream=True
    )
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.status == "completed" and completed.output_text == "Hello there."
    assert completed.usage is not None and completed.usage.total_tokens == 15
    assert completed.instructions == "Be brief."
    assert gateway.backends.model.requests[-1].context.instructions == "Be brief."


async def test_the_stream_helper_rebuilds_the_response(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(reply("One", " two", " three."))
    async with sdk.responses.stream(
        model="gpt-4o-mini", input=[{"role": "user", "content": "Count."}]
    ) as stream:
        text = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(text) == final.output_text == "One two three."


async def test_function_call_arguments_stream_and_come_back(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(
        Script(
            [
                Call(0, "call_7", "get_weather", '{"city":'),
                Call(0, "", "", ' "Paris"}'),
                Finish("tool_calls"),
            ]
        )
    )
    async with sdk.responses.stream(
        model="gpt-4o-mini", input="Weather in Paris?", tools=[WEATHER_TOOL]
    ) as stream:
        deltas = [
            event.delta
            async for event in stream
            if event.type == "response.function_call_arguments.delta"
        ]
        final = await stream.get_final_response()
    assert "".join(deltas) == '{"city": "Paris"}'
    (call,) = final.output
    assert call.type == "function_call" and call.call_id == "call_7"
    assert call.arguments == '{"city": "Paris"}' and call.name == "get_weather"
    # The output goes back as input with the call; not streamed this time.
    gateway.backends.model.queue(reply("Sunny."))
    answer = await sdk.responses.create(
        model="gpt-4o-mini",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_7",
                "name": "get_weather",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": "call_7", "output": '{"sky": "clear"}'},
        ],
        tools=[WEATHER_TOOL],
    )
    assert answer.output_text == "Sunny." and answer.status == "completed"


async def test_server_side_tool_rounds_are_not_shown(gateway: Gateway) -> None:
    """A call to a tenant tool runs in the gateway; the client sees the answer only."""
    gateway.backends.tools["lookup"] = canned_tool("lookup", '{"found": 1}')
    gateway.backends.model.queue(
        Script([Call(0, "call_s", "lookup", "{}"), Finish("tool_calls")]), reply("Found it.")
    )
    answer = await post(
        gateway, {"model": "m", "input": "Find it.", "stream": True}, "/v1/responses"
    )
    events = answer.events()
    kinds = [event["event"] for event in events]
    assert kinds.count("response.created") == 1 and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" not in kinds
    added = [e for e in events if e["event"] == "response.output_item.added"]
    assert len(added) == 1 and '"output_index":0' in added[0]["data"]
    assert all(event["id"] for event in events)


async def test_a_failure_after_the_first_token_is_response_failed(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(Script([Text("Half"), Fail("upstream_stream_broken", "Cut.")]))
    stream = await sdk.responses.create(model="gpt-4o-mini", input="Hi", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.error is not None and failed.error.code == "upstream_stream_broken"


async def test_a_refusal_before_the_first_token_is_an_http_status(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(Script([Fail("server_busy", "Too busy.")]))
    with pytest.raises(openai.InternalServerError) as refused:
        await sdk.responses.create(model="gpt-4o-mini", input="Hi", stream=True)
    assert refused.value.status_code == 503


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": "m"}, "missing_required_parameter", "input"),
        ({"model": "m", "input": 3}, "invalid_value", "input"),
        ({"model": "m", "input": "x", "previous_response_id": "r"}, "unsupported_feature", None),
        ({"model": "m", "input": "x", "top_p": 0.1}, "unsupported_feature", "top_p"),
        ({"model": "m", "input": [{"type": "image"}]}, "unsupported_feature", "input[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, None, "tools[0].type"),
        ({"model": "m", "input": "x", "max_output_tokens": -1}, "invalid_value", None),
    ],
)
async def test_bad_requests_get_openai_errors(
    gateway: Gateway, body: dict[str, Any], code: str | None, param: str | None
) -> None:
    answer = await post(gateway, body, "/v1/responses")
    assert answer.status == 400
    error = answer.json()["error"]
    assert code is None or error["code"] == code
    assert param is None or error["param"] == param
    assert gateway.backends.model.requests == []
