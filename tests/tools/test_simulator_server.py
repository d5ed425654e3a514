"""The simulator as a real server on 127.0.0.1:0, driven by the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator
from tools.simulator.__main__ import parse_config
from tools.simulator.server import MAX_RECORDS, SimulatorState

KEY = "sk-sim-test-key"
ROOT = Path(__file__).resolve().parents[2]
TWO_TURNS: list[Any] = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "What is 2+2?"},
]
TWO_TURNS_TEXT = (
    'turn 2: you said "What is 2+2?"; earlier: "Hello there". orbit saffron garden glass'
    " fern blue timber ember nectar tulip saffron cable cable summit"
)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(host="127.0.0.1", port=0, ttft_ms=20, token_delay_ms=1, api_key=KEY)
    async with run_simulator(config) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def record_of(sim: RunningSimulator, index: int = -1) -> dict[str, Any]:
    return (await sim.streams())[index]


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == ["sim-small", "gpt-4o-mini", "gpt-realtime"]


async def test_streaming_two_turns(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    stream = await client.chat.completions.create(
        model="sim-small", messages=TWO_TURNS, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [
        c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content
    ]
    assert len(tokens) == 24
    assert "".join(tokens) == TWO_TURNS_TEXT
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 24, 31)
    record = await record_of(sim)
    assert record["outcome"] == "completed"
    assert (record["stream"], record["tokens_sent"], record["messages"]) == (True, 24, 3)
    assert record["last_user"] == "What is 2+2?"
    assert record["started_at"] < record["first_token_at"] < record["ended_at"]


async def test_time_to_first_token_and_token_delay(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="m",
        messages=[user('x [[sim {"ttft_ms": 150, "token_delay_ms": 30, "tokens": 6}]]')],
        stream=True,
    )
    arrivals = [
        time.monotonic() - started async for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(arrivals) == 6
    assert arrivals[0] >= 0.15
    assert arrivals[-1] - arrivals[0] >= 5 * 0.03 * 0.8  # slack: arrival, not send, times
    record = await record_of(sim)
    assert record["first_token_at"] - record["started_at"] >= 0.15


async def test_non_streaming(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=TWO_TURNS)
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == TWO_TURNS_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 24)


async def test_fail_times_with_retry_after(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    messages = [user('hi [[sim {"status": 429, "retry_after": 2, "fail_times": 1}]]')]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=messages)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "rate_limit_exceeded"
    # Same request key (model + messages) succeeds the second time, streaming or not.
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text.startswith('turn 1: you said "hi".')
    assert [r["outcome"] for r in await sim.streams()] == ["failed_status", "completed"]
    # A different model is a different key, so it fails once too.
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="other", messages=messages)


async def test_retry_after_in_milliseconds(client: openai.AsyncOpenAI) -> None:
    messages = [user('hi [[sim {"status": 429, "retry_after_ms": 250}]]')]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=messages)
    assert caught.value.response.headers["retry-after-ms"] == "250"
    assert "retry-after" not in caught.value.response.headers


async def test_status_without_fail_times_always_fails(client: openai.AsyncOpenAI) -> None:
    messages = [user('[[sim {"status": 503}]]')]
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m", messages=messages, stream=True)
        assert caught.value.status_code == 503


async def test_tool_calls_stream_then_tool_result(client: openai.AsyncOpenAI) -> None:
    directive = {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
            {"name": "get_time", "arguments": {"tz": "Europe/Paris"}, "id": "call_time"},
        ]
    }
    messages = [user(f"plan my day [[sim {json.dumps(directive)}]]")]
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            assert delta.function is not None
            if delta.id:
                call["id"], call["name"] = delta.id, delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": [1, 2]}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Europe/Paris"}
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 17
    assert (calls[1]["id"], calls[1]["name"]) == ("call_time", "get_time")

    follow_up = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls.values()
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ]
    completion = await client.chat.completions.create(model="m", messages=follow_up)
    choice = completion.choices[0]
    assert choice.message.tool_calls is None  # a tool result never loops into new calls
    assert (choice.message.content or "").startswith("tool get_weather returned sunny ")


async def test_quirk_single_chunk(client: openai.AsyncOpenAI) -> None:
    calls = [{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]
    directive = f"[[sim {json.dumps({'tool_calls': calls, 'quirk': 'single_chunk'})}]]"
    stream = await client.chat.completions.create(
        model="m", messages=[user(directive)], stream=True
    )
    deltas = [d async for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 2
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas if d.function] == [
        (0, "a", '{"x":1}'),
        (1, "b", "{}"),
    ]
    assert all(d.id for d in deltas)


async def test_quirk_finish_stop(client: openai.AsyncOpenAI) -> None:
    directive = '[[sim {"tool_calls": [{"name": "a"}], "quirk": "finish_stop"}]]'
    completion = await client.chat.completions.create(model="m", messages=[user(directive)])
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is not None


async def test_quirk_empty_first_chunk(
    client: openai.AsyncOpenAI, sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "m",
        "messages": [user('x [[sim {"quirk": "empty_first_chunk"}]]')],
        "stream": True,
    }
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as response:
        raw = await response.read()
    first = json.loads(raw.split(b"\n\n")[0].removeprefix(b"data: "))
    assert first["choices"] == []
    assert "usage" not in first
    stream = await client.chat.completions.create(model="m", messages=body["messages"], stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices).startswith(
        "turn 1"
    )


async def test_disconnect_after(
    client: openai.AsyncOpenAI, sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    messages = [user('x [[sim {"disconnect_after": 3}]]')]
    received: list[str] = []
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)

    async def drain() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIConnectionError):
        await drain()
    assert "".join(received) == "turn 1: you"
    record = await record_of(sim)
    assert (record["outcome"], record["tokens_sent"]) == ("sim_disconnected", 3)

    pieces: list[bytes] = []
    body = {"model": "m", "messages": messages, "stream": True}

    async def read_raw() -> None:
        async with http.post(f"{sim.base_url}/chat/completions", json=body) as response:
            async for piece in response.content.iter_any():
                pieces.append(piece)

    # The raw stream ends without [DONE]: aiohttp reports the cut chunked body.
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_raw()
    raw = b"".join(pieces)
    assert raw.count(b'"content"') == 4  # role chunk + 3 tokens
    assert b"[DONE]" not in raw
    assert b'finish_reason":"' not in raw

    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=messages)
    assert (await record_of(sim))["outcome"] == "sim_disconnected"


async def test_max_tokens_finishes_with_length(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=TWO_TURNS,
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == 'turn 2: you said "What'
    )
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    completion = await client.chat.completions.create(
        model="m", messages=TWO_TURNS, max_completion_tokens=2
    )
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == (
        "turn 2:",
        "length",
    )


async def test_wrong_key_is_rejected_without_echo(sim: RunningSimulator) -> None:
    async with openai.AsyncOpenAI(
        base_url=sim.base_url, api_key="sk-wrong-123", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="m", messages=[user("x")])
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "message": "Incorrect API key provided (Switchboard simulator).",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "param": None,
    }
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(f"{sim.base_url}/models") as response,
    ):
        assert response.status == 401
        text = await response.text()
    assert "sk-wrong" not in text and KEY not in text
    assert KEY not in repr(sim.config)


async def test_client_close_is_detected_promptly(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[user('x [[sim {"token_delay_ms": 2000}]]')], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    closed_at = time.time()
    deadline = time.monotonic() + 1.0
    while (record := await record_of(sim))[
        "outcome"
    ] == "in_progress" and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert record["outcome"] == "client_closed"
    assert record["tokens_sent"] == 1
    # Seen at the disconnect, not at the next token write two seconds later.
    assert record["ended_at"] - closed_at < 0.3


async def test_control_endpoints(
    client: openai.AsyncOpenAI, sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sim.url}/healthz") as response:
        assert (response.status, await response.text()) == (200, "ok")
    async with http.get(f"{sim.url}/_sim/config") as response:
        assert await response.json() == {"ttft_ms": 20, "token_delay_ms": 1, "tokens": 24}

    async with http.post(f"{sim.url}/_sim/config", json={"status": 503, "tokens": 3}) as response:
        assert await response.json() == {
            "ttft_ms": 20,
            "token_delay_ms": 1,
            "tokens": 3,
            "status": 503,
        }
    for messages in (TWO_TURNS, [user("other")]):  # every request fails, whatever it says
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=messages)

    async with http.post(f"{sim.url}/_sim/config", json={"tokens": 3}) as response:
        assert response.status == 200
    completion = await client.chat.completions.create(model="m", messages=[user("a b c d")])
    assert completion.choices[0].message.content == 'turn 1: you said "a b c d".'

    async with http.post(f"{sim.url}/_sim/config", json={"bogus": 1}) as response:
        assert response.status == 400
        assert "bogus" in (await response.json())["error"]["message"]
    async with http.post(f"{sim.url}/_sim/config", json={}) as response:
        assert await response.json() == {"ttft_ms": 20, "token_delay_ms": 1, "tokens": 24}

    async with http.get(f"{sim.url}/_sim/streams") as response:
        streams = (await response.json())["streams"]
    assert [s["outcome"] for s in streams] == ["failed_status", "failed_status", "completed"]
    assert set(streams[0]) == {
        "id", "model", "stream", "request_key", "started_at", "first_token_at",
        "ended_at", "outcome", "tokens_sent", "messages", "last_user", "traceparent",
    }  # fmt: skip
    async with http.delete(f"{sim.url}/_sim/streams") as response:
        assert response.status == 200
    assert await sim.streams() == []
    await client.chat.completions.create(model="m", messages=[user("x")])
    await sim.clear()
    assert await sim.streams() == []
    assert SimulatorState(sim.config).records.maxlen == MAX_RECORDS


async def test_bad_directive_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[user('[[sim {"tokns": 3}]]')])
    assert "tokns" in caught.value.message


async def test_many_concurrent_streams(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="m", messages=[user(f"n{i}")], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    texts = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(t.startswith(f'turn 1: you said "n{i}".') for i, t in enumerate(texts))
    assert {r["outcome"] for r in await sim.streams()} == {"completed"}


def test_cli_flags_win_over_environment() -> None:
    environ = {
        "SWITCHBOARD_SIM_PORT": "9",
        "SWITCHBOARD_SIM_TTFT_MS": "7",
        "SWITCHBOARD_SIM_API_KEY": "k",
        "SWITCHBOARD_SIM_MODELS": "env-model",
    }
    config = parse_config(["--port", "0", "--models", "x, y"], environ)
    assert config == SimulatorConfig(port=0, ttft_ms=7, api_key="k", models=("x", "y"))
    assert parse_config([], {}) == SimulatorConfig()
    with pytest.raises(SystemExit):
        parse_config([], {"SWITCHBOARD_SIM_TOKEN_DELAY_MS": "-3"})
    with pytest.raises(SystemExit):
        parse_config(["--reply-tokens", "many"], {})


async def test_cli_prints_address_and_stops_on_sigterm() -> None:
    env = {**os.environ, "SWITCHBOARD_SIM_REPLY_TOKENS": "5", "SWITCHBOARD_SIM_TTFT_MS": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.simulator", "--port", "0", "--models", "a,b",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.removeprefix("simulator listening on ").strip()
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="any", max_retries=0) as c:
            assert [m.id for m in (await c.models.list()).data] == ["a", "b"]
            completion = await c.chat.completions.create(model="a", messages=[user("hi")])
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert await process.stdout.read() == b""  # exactly one line
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_stopping_cuts_streams_in_flight() -> None:
    config = SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=2000)
    async with openai.AsyncOpenAI(
        base_url="http://unused/v1", api_key="x", max_retries=0
    ) as client:
        async with run_simulator(config) as sim:
            stream = await client.with_options(base_url=sim.base_url).chat.completions.create(
                model="m", messages=[user("x")], stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 0.5  # no waiting for the 2 s token delay

        async def drain() -> None:
            async for _ in stream:
                pass

        with pytest.raises(openai.APIConnectionError):
            await drain()
    record = await record_of(sim)
    assert (record["outcome"], record["tokens_sent"]) == ("sim_disconnected", 1)
