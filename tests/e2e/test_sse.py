"""The OpenAI HTTP APIs over SSE through the real processes: the official `openai`
SDK with `base_url` at the gateway, two gateway replicas, the simulator upstream
(watched from the outside for cancellations), limits shared with the WebSocket
path."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, tenants_file
from tests.e2e.test_cancel import ended
from tools.stack import Ports, Stack

OPEN_KEY, RATED_KEY = new_key(), new_key()
TENANTS = f"""
  open:
    keys: ["{hash_key(OPEN_KEY)}"]
    models: {{gpt-4o-mini: {{upstream: default}}, gpt-realtime: {{upstream: default}}}}
  rated:
    keys: ["{hash_key(RATED_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}, gpt-4o-mini: {{upstream: default}}}}
    limits: {{requests_per_minute: 7}}
"""
LONG = '[[sim {"tokens": 3000, "token_delay_ms": 10}]]'
WEATHER = '[[sim {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]]'
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS)
    with Stack(
        ports=ports,
        replicas=2,
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "2", "--reply-tokens", "30"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    ) as stack:
        yield stack


def sdk(stack: Stack, key: str = OPEN_KEY, port: int | None = None) -> openai.AsyncOpenAI:
    port = port or stack.gateway_ports[0]
    return openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)


@pytest.fixture
async def gateway_sdk(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(stack) as client:
        yield client


@pytest.fixture
async def direct_sdk(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """The same SDK straight at the simulator: what the gateway must look like."""
    async with openai.AsyncOpenAI(
        api_key="sk-simulator-not-a-secret", base_url=f"{stack.simulator_url}/v1", max_retries=0
    ) as client:
        yield client


async def chunks_of(client: openai.AsyncOpenAI, **request: Any) -> list[Any]:
    stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True, **request)
    return [chunk async for chunk in stream]


def shape(chunks: list[Any]) -> dict[str, Any]:
    """What must agree between the gateway's stream and OpenAI-shaped upstream's."""
    choices = [c.choices[0] for c in chunks if c.choices]
    calls: dict[int, dict[str, str]] = {}
    for choice in choices:
        for call in choice.delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    usage = [c.usage for c in chunks if c.usage is not None]
    return {
        "role": choices[0].delta.role,
        "text": "".join(choice.delta.content or "" for choice in choices),
        "calls": calls,
        "finish": [choice.finish_reason for choice in choices if choice.finish_reason],
        "usage_chunks": len(usage),
        "last_is_usage": chunks[-1].choices == [] and chunks[-1].usage is not None,
        "objects": {c.object for c in chunks},
    }


async def test_the_sdk_streams_what_the_upstream_streams(
    gateway_sdk: openai.AsyncOpenAI, direct_sdk: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about the sea."}]
    options: Any = {"include_usage": True}
    through = await chunks_of(gateway_sdk, messages=messages, stream_options=options)
    direct = await chunks_of(direct_sdk, messages=messages, stream_options=options)
    assert shape(through) == shape(direct)
    assert shape(through)["text"] and shape(through)["finish"] == ["stop"]
    # Not streamed: the same text, as one chat.completion.
    whole = await gateway_sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert whole.choices[0].message.content == shape(direct)["text"]
    assert whole.usage is not None and whole.usage.completion_tokens > 0


async def test_tool_call_deltas_are_the_upstreams(
    gateway_sdk: openai.AsyncOpenAI, direct_sdk: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": f"Weather? {WEATHER}"}]
    through = await chunks_of(gateway_sdk, messages=messages, tools=[WEATHER_TOOL])
    direct = await chunks_of(direct_sdk, messages=messages, tools=[WEATHER_TOOL])
    assert shape(through) == shape(direct)
    assert shape(through)["calls"] == {0: {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert shape(through)["finish"] == ["tool_calls"]


async def test_a_model_the_tenant_may_not_use_is_not_found(stack: Stack) -> None:
    async with sdk(stack) as client:
        with pytest.raises(openai.NotFoundError) as refused:
            await client.chat.completions.create(
                model="gpt-5-secret", messages=[{"role": "user", "content": "hi"}], stream=True
            )
    assert refused.value.code == "model_not_allowed"


async def test_limits_are_shared_with_the_websocket_path_across_replicas(stack: Stack) -> None:
    """24 requests of one tenant, half over SSE and half over the WebSocket, spread
    over two gateways: exactly its 7 requests per minute are admitted."""
    ports = itertools.cycle(stack.gateway_ports)
    refusals: list[openai.RateLimitError] = []

    async def over_sse(port: int, n: int) -> bool:
        async with sdk(stack, RATED_KEY, port) as client:
            try:
                await chunks_of(client, messages=[{"role": "user", "content": f"sse {n}"}])
            except openai.RateLimitError as error:
                refusals.append(error)
                return False
            return True

    async def over_websocket(port: int, n: int) -> bool:
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        headers = {"Authorization": f"Bearer {RATED_KEY}"}
        async with websockets.connect(url, additional_headers=headers) as connection:
            client = RealtimeClient(connection)
            await client.recv()
            await client.say(f"ws {n}")
            done = (await client.respond())[-1]["response"]
            return bool(done["status"] == "completed")

    results = await asyncio.gather(
        *((over_sse if n % 2 else over_websocket)(next(ports), n) for n in range(24))
    )
    assert sum(results) == 7
    assert refusals, "no SSE request was refused"
    for error in refusals:
        assert error.code == "rate_limit_exceeded"
        assert int(error.response.headers["retry-after"]) >= 1


async def test_a_client_that_disconnects_closes_the_upstream_within_100_ms(
    stack: Stack,
) -> None:
    delays = []
    for attempt in range(5):
        marker = f"sse leave {attempt}"
        async with sdk(stack) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"{marker} {LONG}"}],
                stream=True,
            )
            deltas = 0
            async for chunk in stream:
                deltas += bool(chunk.choices and chunk.choices[0].delta.content)
                if deltas == 5:
                    break
            left_at = time.time()
            await stream.close()
        stream_seen = await ended(stack, marker)
        assert stream_seen["outcome"] == "client_closed"
        delays.append(stream_seen["ended_at"] - left_at)
    print(f"upstream closed after the SSE client left: {[round(d * 1000) for d in delays]} ms")
    assert statistics.median(delays) < 0.1, delays


async def test_the_responses_api_streams_what_chat_completions_streams(
    gateway_sdk: openai.AsyncOpenAI,
) -> None:
    """One conversation, both APIs, the same upstream: the same text."""
    messages: Any = [{"role": "user", "content": "Tell me about the hills."}]
    chat = shape(await chunks_of(gateway_sdk, messages=messages))["text"]
    async with gateway_sdk.responses.stream(model="gpt-4o-mini", input=messages) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == chat
    assert final.usage is not None and final.usage.output_tokens > 0


async def test_the_responses_api_streams_tool_calls(gateway_sdk: openai.AsyncOpenAI) -> None:
    tool: Any = {"type": "function", **WEATHER_TOOL["function"]}
    async with gateway_sdk.responses.stream(
        model="gpt-4o-mini", input=f"Weather? {WEATHER}", tools=[tool]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == '{"city":"Paris"}'


def test_the_sync_sdk_streams_both_apis(stack: Stack) -> None:
    port = stack.gateway_ports[1]
    with openai.OpenAI(
        api_key=OPEN_KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    ) as client:
        chat = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "sync"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        events = list(client.responses.create(model="gpt-4o-mini", input="sync", stream=True))
    assert text
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == text  # type: ignore[union-attr]
