"""BrokerService through a real grpc.aio server and stub, against the real upstream simulator.

The upstream is `tools.simulator` on 127.0.0.1:0 (a SIMULATOR, not a model); the
broker reaches it over HTTP with its own aiohttp client (`chat_stream`).
These tests run the development setup of `make run` (`SWITCHBOARD_TENANT_KEYS`
and the broker's upstream variables); test_routing.py covers a tenants file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from switchboard.broker.chat_stream import (
    SseDecoder,
    retry_after_seconds,
    sanitize,
    upstream_host,
)
from switchboard.broker.clients import UpstreamClient
from switchboard.broker.translate import chat_request
from switchboard.config import BrokerSettings
from switchboard.errors import GRPC_CODE_KEY, GRPC_RETRY_KEY
from switchboard.tenancy import Upstream
from tests.broker.harness import (
    B,
    C,
    ManualContext,
    Stub,
    assistant,
    collect,
    dev_env,
    directive,
    eventually,
    generate_request,
    kinds,
    rpc_error,
    serving,
    text_of,
    trailers,
    user,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

REPLY_TOKENS = 12


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=10, token_delay_ms=1, reply_tokens=REPLY_TOKENS)
    async with run_simulator(config) as running_sim:
        yield running_sim


@pytest.fixture
async def stub(sim: RunningSimulator) -> AsyncIterator[Stub]:
    async with serving(dev_env(sim.base_url)) as (client, _, _):
        yield client


WEATHER = C.ToolDefinition(
    name="get_weather", parameters_json='{"type":"object","properties":{"city":{}}}'
)
CLOCK = C.ToolDefinition(name="get_time", parameters_json='{"type":"object"}')


async def stream_ended(sim: RunningSimulator) -> dict[str, Any] | None:
    """The simulator's only stream record once it is no longer in progress."""
    (record,) = await sim.streams()
    return None if record["outcome"] == "in_progress" else record


# ------------------------------------------------------------------- success


async def test_text_reply_streams_and_reports_the_upstream_usage(
    stub: Stub, sim: RunningSimulator
) -> None:
    events = await collect(stub, generate_request(user("Hello there")))
    kinds_seen = kinds(events)
    assert kinds_seen == ["started"] + ["text_delta"] * REPLY_TOKENS + ["finished"]
    # The development upstream is called `default`; Started names it and its host.
    host = sim.url.removeprefix("http://")
    assert events[0].started == B.Started(upstream=f"default ({host})", upstream_model="sim-small")
    text = text_of(events)
    assert text.startswith('turn 1: you said "Hello there". ')
    assert len(text.split()) == REPLY_TOKENS

    finished = events[-1].finished
    assert finished.reason == B.FINISH_REASON_STOP
    # The simulator's documented usage: ceil(prompt characters / 4) and one token per chunk.
    prompt = math.ceil(len("Hello there") / 4)
    assert finished.usage == C.Usage(
        input_tokens=prompt, output_tokens=REPLY_TOKENS, total_tokens=prompt + REPLY_TOKENS
    )
    (record,) = await sim.streams()
    assert (record["outcome"], record["tokens_sent"]) == ("completed", REPLY_TOKENS)
    assert record["last_user"] == "Hello there"


async def test_second_turn_sees_the_first(stub: Stub) -> None:
    req = generate_request(
        user("My name is Ada"), assistant("Hello Ada!"), user("What is my name?")
    )
    text = text_of(await collect(stub, req))
    assert text.startswith('turn 2: you said "What is my name?"; earlier: "My name is Ada".')


async def test_one_log_line_per_call_without_prompt_text(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.broker")
    await collect(stub, generate_request(user("my secret plans"), response_id="resp_1"))
    (record,) = [r for r in caplog.records if r.name == "switchboard.broker.service"]
    assert record.getMessage() == "generate completed"
    fields = vars(record)
    names = ("tenant_id", "session_id", "response_id", "model", "upstream", "upstream_model")
    assert {k: fields[k] for k in names} == {
        "tenant_id": "t1",
        "session_id": "sess_1",
        "response_id": "resp_1",
        "model": "sim-small",
        "upstream": "default",
        "upstream_model": "sim-small",
    }
    assert fields["output_tokens"] == REPLY_TOKENS
    assert fields["finish_reason"] == "FINISH_REASON_STOP"
    assert fields["duration_ms"] >= fields["ttft_ms"] >= 0
    assert "secret" not in repr(fields)


async def test_upstream_model_setting_replaces_the_requested_model(
    sim: RunningSimulator,
) -> None:
    config = dev_env(sim.base_url, SWITCHBOARD_BROKER_UPSTREAM_MODEL="gpt-4o-mini")
    async with serving(config) as (stub, _, _):
        events = await collect(stub, generate_request(user("hi")))
    assert events[0].started.upstream_model == "gpt-4o-mini"
    assert (await sim.streams())[0]["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("quirk", [None, "single_chunk", "finish_stop", "empty_first_chunk"])
async def test_parallel_tool_calls_are_assembled(stub: Stub, quirk: str | None) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris"}},
    ]
    behaviour: dict[str, Any] = {"tool_calls": calls}
    if quirk:
        behaviour["quirk"] = quirk
    req = generate_request(
        user(f"Weather and time? {directive(**behaviour)}"), tools=[WEATHER, CLOCK]
    )
    events = await collect(stub, req)
    finished = events[-1].finished
    assert finished.reason == B.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments)) for c in finished.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]
    assert all(c.call_id.startswith("call_") for c in finished.tool_calls)
    deltas = [e.tool_call_delta for e in events if e.WhichOneof("event") == "tool_call_delta"]
    for index, call in enumerate(finished.tool_calls):
        mine = [d for d in deltas if d.index == index]
        assert (mine[0].call_id, mine[0].name) == (call.call_id, call.name)
        assert "".join(d.arguments for d in mine) == call.arguments
    if quirk is None:
        # Arguments arrive in 5-character fragments, each streamed as it comes.
        assert len(deltas) > 6
    assert not finished.usage.estimated


async def test_tool_results_are_sent_back(stub: Stub) -> None:
    call = C.Item(
        type=C.ITEM_TYPE_FUNCTION_CALL,
        call_id="call_w",
        name="get_weather",
        arguments='{"city":"Paris"}',
    )
    result = C.Item(type=C.ITEM_TYPE_FUNCTION_CALL_OUTPUT, call_id="call_w", output="21C sunny")
    req = generate_request(user("Weather in Paris?"), call, result, tools=[WEATHER])
    text = text_of(await collect(stub, req))
    assert text.startswith("tool get_weather returned 21C sunny")


async def test_rate_limit_once_is_retried_by_the_broker(sim: RunningSimulator) -> None:
    hello = f"hi {directive(status=429, retry_after=0.05, fail_times=1)}"
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        events = await collect(stub, generate_request(user(hello)))
    assert kinds(events)[0] == "started"
    assert kinds(events)[-1] == "finished"
    assert [r["outcome"] for r in await sim.streams()] == ["failed_status", "completed"]
    retries = servicer.metrics.upstream_retries.labels("default", "rate_limited")
    assert retries._value.get() == 1


# -------------------------------------------------------------------- errors


async def test_persistent_rate_limit_is_resource_exhausted_with_retry_after(
    stub: Stub, sim: RunningSimulator
) -> None:
    hello = f"hi {directive(status=429, retry_after=0.05, fail_times=10)}"
    error, seen = await rpc_error(stub, generate_request(user(hello)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_rate_limited"
    assert float(trailers(error)[GRPC_RETRY_KEY]) == pytest.approx(0.05)
    assert seen == []
    assert "retry after 0.05 s" in str(error.details())
    # SWITCHBOARD_BROKER_RETRY_ATTEMPTS: three attempts in all by default.
    assert [r["outcome"] for r in await sim.streams()] == ["failed_status"] * 3


async def test_server_error(stub: Stub, sim: RunningSimulator) -> None:
    error, _ = await rpc_error(stub, generate_request(user(f"hi {directive(status=500)}")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert "HTTP 500" in str(error.details())
    assert len(await sim.streams()) == 3


async def test_bad_request_passes_the_upstream_message(stub: Stub) -> None:
    error, _ = await rpc_error(stub, generate_request(user(f"hi {directive(status=404)}")))
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert "HTTP 404" in str(error.details())
    assert "simulator" in str(error.details()).lower()


async def test_disconnect_mid_stream_is_a_broken_stream(stub: Stub, sim: RunningSimulator) -> None:
    error, seen = await rpc_error(
        stub, generate_request(user(f"hi {directive(disconnect_after=3)}"))
    )
    assert error.code() == grpc.StatusCode.ABORTED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_stream_broken"
    # The simulator closes right after the third token; when that token and the
    # close arrive in one read, the transport reports the broken body without
    # handing over the token, so the count is 2 or 3 (never more, never a finish).
    assert seen[0] == "started"
    assert seen[1:] in (["text_delta"] * 2, ["text_delta"] * 3)
    # Never retried once the stream started.
    assert [r["outcome"] for r in await sim.streams()] == ["sim_disconnected"]


async def test_silent_upstream_is_a_timeout(sim: RunningSimulator) -> None:
    config = dev_env(
        sim.base_url,
        SWITCHBOARD_BROKER_READ_TIMEOUT_S="0.2",
        SWITCHBOARD_BROKER_RETRY_ATTEMPTS="1",
    )
    async with serving(config) as (stub, _, _):
        started = time.monotonic()
        error, seen = await rpc_error(stub, generate_request(user(f"x {directive(ttft_ms=3000)}")))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_timeout"
    # Started goes out with the first delta, which never came.
    assert seen == []
    assert time.monotonic() - started < 1.5


async def test_rejected_key_is_never_revealed() -> None:
    secret = "sk-wrong-key-0123456789abcdef"
    config = SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=0, api_key="sk-the-right-key")
    async with (
        run_simulator(config) as sim,
        serving(dev_env(sim.base_url, SWITCHBOARD_BROKER_UPSTREAM_API_KEY=secret)) as (stub, _, _),
    ):
        error, _ = await rpc_error(stub, generate_request(user("hi")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert error.details() == "The upstream rejected the configured credentials."
    assert "0123456789" not in repr(error.trailing_metadata())


async def test_upstream_down_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: every connection is refused.
    async with serving(dev_env(f"http://127.0.0.1:{port}/v1")) as (stub, _, _):
        started = time.monotonic()
        error, seen = await rpc_error(stub, generate_request(user("hi")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert error.details() == "The upstream is unreachable."
    assert seen == []
    # Two quick retries with backoff, no timeouts waited out.
    assert time.monotonic() - started < 3.0


async def test_missing_model_is_an_invalid_request(sim: RunningSimulator, stub: Stub) -> None:
    error, _ = await rpc_error(stub, generate_request(user("hi"), model=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers(error)[GRPC_CODE_KEY] == "missing_required_parameter"
    assert await sim.streams() == []


# -------------------------------------------------------------- cancellation


def long_reply() -> B.GenerateRequest:
    return generate_request(user(f"go on {directive(token_delay_ms=200, tokens=100)}"))


async def test_cancel_then_cancelling_the_call_closes_the_upstream_stream(
    stub: Stub, sim: RunningSimulator
) -> None:
    # How a gateway stops a response: Cancel at the broker, then cancel the call.
    # (Cancelling the call alone leaves the model running for a re-attach: test_calls.py.)
    request = long_reply()
    call = stub.Generate(request)
    assert (await call.read()).WhichOneof("event") == "started"
    assert (await call.read()).WhichOneof("event") == "text_delta"
    cancelled_at = time.time()
    cancel = B.CancelRequest(tenant_id=request.tenant_id, response_id=request.response_id)
    assert (await stub.Cancel(cancel)).cancelled
    call.cancel()

    record = await eventually(lambda: stream_ended(sim))
    assert record["outcome"] == "client_closed"
    print(f"upstream closed {record['ended_at'] - cancelled_at:.4f} s after the Cancel")
    assert record["ended_at"] - cancelled_at < 0.1
    assert record["tokens_sent"] < 5


async def test_cancelled_reader_exits_the_response_and_closes_the_connection(
    sim: RunningSimulator,
) -> None:
    # Everything stays referenced here, so garbage collection cannot be what closes
    # the connection: leaving the `async with` on CancelledError must.
    upstream = UpstreamClient.build(
        Upstream("default", sim.base_url), BrokerSettings.from_environ({})
    )
    stream = upstream.stream(chat_request(long_reply(), None))
    two_chunks = asyncio.Event()

    async def read() -> None:
        async with stream as chunks:
            seen = 0
            async for _ in chunks:
                seen += 1
                if seen == 2:
                    two_chunks.set()

    reader = asyncio.create_task(read())
    try:
        await two_chunks.wait()
        reader.cancel()
        cancelled_at = time.time()
        with pytest.raises(asyncio.CancelledError):
            await reader
        record = await eventually(lambda: stream_ended(sim))
        assert record["outcome"] == "client_closed"
        assert record["ended_at"] - cancelled_at < 0.1
        assert upstream.active == 0
    finally:
        await upstream.aclose()


async def test_done_callback_orphans_a_call_abandoned_at_a_yield(sim: RunningSimulator) -> None:
    # grpc.aio leaves the generator suspended at a `yield` when the cancellation
    # lands in its own write; the done callback must let go of the call anyway:
    # held, it runs on for an Attach; without a response id, its upstream closes.
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        held, unheld = ManualContext(), ManualContext()
        request = generate_request(user(f"keep going {directive(token_delay_ms=20, tokens=20)}"))
        anonymous = long_reply()
        anonymous.response_id = ""
        generators = [servicer.Generate(request, held), servicer.Generate(anonymous, unheld)]
        try:
            for generator in generators:
                assert (await anext(generator)).WhichOneof("event") == "started"
                assert (await anext(generator)).WhichOneof("event") == "text_delta"
            done_at = time.time()
            for context in (held, unheld):
                for callback in context.callbacks:
                    callback(context)

            async def one_closed() -> dict[str, Any] | None:
                closed = [r for r in await sim.streams() if r["outcome"] == "client_closed"]
                return closed[0] if closed else None

            record = await eventually(one_closed)
            assert record["ended_at"] - done_at < 0.1
            assert record["last_user"] == "go on"  # the anonymous long reply
            assert servicer.metrics.orphaned_requests._value.get() == 1
            attach = B.AttachRequest(tenant_id=request.tenant_id, response_id=request.response_id)
            events = [event async for event in stub.Attach(attach)]
            assert kinds(events)[-1] == "finished"
            assert len(text_of(events).split()) == 20
        finally:
            for generator in generators:
                await generator.aclose()


# ------------------------------------------------- upstream wire helpers (pure)


def test_sse_decoder_handles_split_lines_comments_and_multiline_data() -> None:
    decoder = SseDecoder()
    body = (
        b": keep-alive\n\n"
        b'data: {"a":1}\r\n\r\n'
        b"event: message\nid: 7\ndata: line one\ndata:line two\n\n"
        b"data:\n\n"
        b"data: [DONE]\n\n"
    )
    events: list[bytes] = []
    for i in range(len(body)):  # one byte at a time: every split point
        events += decoder.feed(body[i : i + 1])
    assert events == [b'{"a":1}', b"line one\nline two", b"[DONE]"]
    assert decoder.close() == []


def test_sse_decoder_returns_an_unterminated_last_event_on_close() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: x\r\rdata: [DONE]") == [b"x"]
    assert decoder.close() == [b"[DONE]"]


def test_sanitize_removes_keys_and_truncates() -> None:
    text = "Incorrect API key provided: sk-proj-abc***xyz1. Header Bearer abc.def\n" + "x" * 500
    clean = sanitize(text, ("abc.def",))
    assert "sk-proj" not in clean and "abc.def" not in clean and "\n" not in clean
    assert len(clean) <= 300


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    date = "Wed, 01 Jan 2026 00:00:10 GMT"
    assert retry_after_seconds({"retry-after": date}, now=1767225600.0) == 10.0
    assert retry_after_seconds({}) is None


def test_the_host_drops_credentials_and_query() -> None:
    assert upstream_host("https://u:p@example.com:8443/v1/?key=s") == "example.com:8443"
    assert upstream_host("http://[::1]/v1") == "[::1]"
