"""A call outlives its caller: orphans, Attach, Cancel, through a real grpc.aio server.

The broker runs behind a real grpc.aio server and stub (`harness.serving`),
against the upstream SIMULATOR (`tools.simulator`, not a model), whose
observation log says when the upstream stream ended and how. A caller that
"dies" is a Generate call cancelled by its client: the broker cannot tell the
two apart. The bookkeeping of `calls.Calls` without gRPC is in test_registry.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from switchboard.errors import GRPC_CODE_KEY
from switchboard.rpc import BROKER_METADATA_KEY
from tests.broker.harness import (
    DEV_TENANT,
    B,
    Served,
    Stub,
    collect,
    dev_env,
    directive,
    eventually,
    generate_request,
    kinds,
    serving,
    text_of,
    trailers,
    user,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=10, token_delay_ms=1, reply_tokens=12)
    async with run_simulator(config) as running_sim:
        yield running_sim


@pytest.fixture
async def broker(sim: RunningSimulator) -> AsyncIterator[Served]:
    async with serving(dev_env(sim.base_url)) as served:
        yield served


def slow(text: str = "go on", **behaviour: Any) -> B.GenerateRequest:
    """A reply of 40 tokens 10 ms apart (~0.4 s), unless `behaviour` says otherwise."""
    return generate_request(
        user(f"{text} {directive(**{'tokens': 40, 'token_delay_ms': 10, **behaviour})}")
    )


def same_prompt(request: B.GenerateRequest) -> B.GenerateRequest:
    """The same call under another response id: the simulator answers it the same."""
    copy = B.GenerateRequest()
    copy.CopyFrom(request)
    copy.response_id = f"{request.response_id}_reference"
    return copy


def attach_request(request: B.GenerateRequest, tenant_id: str | None = None) -> B.AttachRequest:
    return B.AttachRequest(
        tenant_id=tenant_id or request.tenant_id, response_id=request.response_id
    )


def cancel_request(request: B.GenerateRequest) -> B.CancelRequest:
    return B.CancelRequest(tenant_id=request.tenant_id, response_id=request.response_id)


async def read(call: Any, texts: int) -> list[B.GenerateEvent]:
    """Events of `call` up to and including its `texts`-th delta."""
    events: list[B.GenerateEvent] = []
    while sum(kind.endswith("_delta") for kind in kinds(events)) < texts:
        event = await call.read()
        assert event is not grpc.aio.EOF, kinds(events)
        events.append(event)
    return events


async def rest(call: Any) -> list[B.GenerateEvent]:
    """The events of `call` to its end (read with `read`, so it may be read before)."""
    events: list[B.GenerateEvent] = []
    await drain(call, events)
    return events


async def drain(call: Any, into: list[B.GenerateEvent]) -> None:
    while (event := await call.read()) is not grpc.aio.EOF:
        into.append(event)


async def failure(call: Any) -> tuple[grpc.aio.AioRpcError, list[B.GenerateEvent]]:
    """The error `call` ends with, and the events before it."""
    events: list[B.GenerateEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain(call, events)
    return caught.value, events


async def only_stream(sim: RunningSimulator, *, ended: bool) -> dict[str, Any] | None:
    """The simulator's one stream record, once it has (or has not yet) ended."""
    (record,) = await sim.streams()
    return record if (record["outcome"] != "in_progress") == ended else None


def value(metric: Any) -> float:
    return float(metric._value.get())


async def orphaned(served: Served, count: float = 1) -> None:
    """Wait until the broker holds `count` orphans (the done callback has run)."""

    async def check() -> bool | None:
        return True if value(served.servicer.metrics.orphaned_requests) == count else None

    await eventually(check)


async def leave(served: Served, call: Any) -> None:
    """The caller goes away without Cancel (as a killed gateway does)."""
    call.cancel()
    await orphaned(served)


async def not_held(stub: Stub, request: B.AttachRequest) -> grpc.aio.AioRpcError:
    error, events = await failure(stub.Attach(request))
    assert events == []
    return error


def answer(error: grpc.aio.AioRpcError) -> tuple[Any, ...]:
    return (error.code(), error.details(), trailers(error))


def tool_arguments(events: list[B.GenerateEvent]) -> dict[int, tuple[str, str, str]]:
    """Per tool call index: (call_id, name, all arguments), merged from the deltas."""
    calls: dict[int, tuple[str, str, str]] = {}
    for event in events:
        if event.WhichOneof("event") != "tool_call_delta":
            continue
        delta = event.tool_call_delta
        call_id, name, arguments = calls.get(delta.index, ("", "", ""))
        calls[delta.index] = (
            call_id or delta.call_id,
            name or delta.name,
            arguments + delta.arguments,
        )
    return calls


# ------------------------------------------------------------------- Cancel


@pytest.mark.parametrize("first", ["cancel", "caller"])
async def test_cancel_closes_the_upstream_at_once(
    broker: Served, sim: RunningSimulator, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.broker")
    request = slow(tokens=100, token_delay_ms=50)
    call = broker.stub.Generate(request)
    await read(call, 2)
    if first == "caller":
        await leave(broker, call)  # orphaned: the model would go on without the Cancel

    cancelled_at = time.time()
    reply = await broker.stub.Cancel(cancel_request(request))

    record = await eventually(lambda: only_stream(sim, ended=True))
    print(f"upstream closed {record['ended_at'] - cancelled_at:.4f} s after the Cancel")
    assert record["outcome"] == "client_closed"
    assert record["ended_at"] - cancelled_at < 0.1
    assert record["tokens_sent"] < 10
    assert reply.cancelled is True
    if first == "cancel":
        # The follower's stream ends at once, as cancelled.
        error, _ = await failure(call)
        assert error.code() == grpc.StatusCode.CANCELLED
        call.cancel()
    assert not broker.servicer.calls.holds(request.tenant_id, request.response_id)
    queue = broker.servicer.dispatcher.admission.queue(broker.tenants.current.upstreams["default"])
    assert queue.running == 0
    assert value(broker.servicer.metrics.orphaned_requests) == 0
    cancelled = [r for r in caplog.records if r.getMessage() == "call cancelled"]
    fields = [vars(r) for r in cancelled]
    assert [(f["tenant_id"], f["response_id"], f["orphaned"]) for f in fields] == [
        (DEV_TENANT, request.response_id, first == "caller")
    ]
    error = await not_held(broker.stub, attach_request(request))
    assert trailers(error)[GRPC_CODE_KEY] == "response_interrupted"


async def test_cancel_of_a_call_the_broker_does_not_hold_is_false(broker: Served) -> None:
    reply = await broker.stub.Cancel(B.CancelRequest(tenant_id=DEV_TENANT, response_id="resp_x"))
    assert reply.cancelled is False
    # A call that was read to the end is no longer held either.
    request = generate_request(user("hi"))
    assert kinds(await collect(broker.stub, request))[-1] == "finished"
    assert (await broker.stub.Cancel(cancel_request(request))).cancelled is False


# ------------------------------------------------------------------- orphans


@pytest.mark.parametrize("when", ["mid_way", "after_the_end"])
async def test_a_call_whose_caller_left_runs_on_and_attach_gets_all_of_it(
    broker: Served, sim: RunningSimulator, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.broker")
    request = slow("tell me everything")
    reference = await collect(broker.stub, same_prompt(request))
    await sim.clear()

    call = broker.stub.Generate(request)
    seen = await read(call, 3)
    await leave(broker, call)
    record = await only_stream(sim, ended=False)
    assert record is not None, "the model stopped when its caller left"
    if when == "after_the_end":
        record = await eventually(lambda: only_stream(sim, ended=True))
        assert record["outcome"] == "completed"
        assert broker.servicer.calls.holds(request.tenant_id, request.response_id)

    events = await collect_attach(broker.stub, attach_request(request))
    assert events[0] == reference[0]  # Started, as it was sent
    # The snapshot: one delta with everything so far, which begins with what the caller saw.
    assert events[1].text_delta.text.startswith(text_of(seen))
    assert text_of(events) == text_of(reference)
    assert events[-1] == reference[-1]  # Finished, with the usage
    assert events[-1].finished.usage.output_tokens == 40
    if when == "after_the_end":
        assert kinds(events) == ["started", "text_delta", "finished"]
    else:
        assert kinds(events).count("text_delta") > 1  # the live rest followed the snapshot
    assert [r["outcome"] for r in await sim.streams()] == ["completed"]  # one upstream call
    assert not broker.servicer.calls.holds(request.tenant_id, request.response_id)
    metrics = broker.servicer.metrics
    assert value(metrics.orphans.labels("attached")) == 1
    assert value(metrics.orphaned_requests) == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "switchboard.broker.calls"]
    assert logged == ["call orphaned", "call attached"]
    for line in caplog.records:
        assert "tell me everything" not in repr(vars(line))


async def collect_attach(stub: Stub, request: B.AttachRequest) -> list[B.GenerateEvent]:
    return [event async for event in stub.Attach(request)]


async def test_attach_takes_the_call_from_its_follower(broker: Served) -> None:
    request = slow()
    reference = await collect(broker.stub, same_prompt(request))

    original = broker.stub.Generate(request)
    await read(original, 2)
    attached = broker.stub.Attach(attach_request(request))
    first = await attached.read()  # the switch-over has happened once Attach streams
    assert first == reference[0]

    error, _ = await failure(original)
    assert error.code() == grpc.StatusCode.ABORTED
    assert trailers(error)[GRPC_CODE_KEY] == "session_taken_over"
    events = [first, *await rest(attached)]
    assert text_of(events) == text_of(reference)  # snapshot + live: every token exactly once
    assert events[-1] == reference[-1]
    assert value(broker.servicer.metrics.attaches.labels("taken_over")) == 1
    assert value(broker.servicer.metrics.orphans.labels("attached")) == 0


async def test_a_tool_call_reply_attached_mid_way_has_whole_arguments(
    broker: Served, sim: RunningSimulator
) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "units": "metric"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris", "format": "24h"}},
    ]
    request = slow("weather and time?", tool_calls=calls, args_chunk=4)
    reference = await collect(broker.stub, same_prompt(request))
    await sim.clear()

    call = broker.stub.Generate(request)
    seen = await read(call, 4)  # inside the first call's arguments
    await leave(broker, call)
    events = await collect_attach(broker.stub, attach_request(request))

    expected = tool_arguments(reference)
    assert [json.loads(arguments) for _, _, arguments in expected.values()] == [
        c["arguments"] for c in calls
    ]
    assert tool_arguments(events) == expected
    # The snapshot merged what the caller had seen into one delta with call_id and name.
    snapshot = events[1].tool_call_delta
    assert (snapshot.index, snapshot.call_id, snapshot.name) == (0, *expected[0][:2])
    assert snapshot.arguments.startswith(tool_arguments(seen)[0][2])
    assert events[-1] == reference[-1]
    assert events[-1].finished.reason == B.FINISH_REASON_TOOL_CALLS


async def test_an_orphan_that_fails_hands_its_error_to_the_attacher(
    broker: Served, sim: RunningSimulator
) -> None:
    request = slow(disconnect_after=20)
    call = broker.stub.Generate(request)
    await read(call, 2)
    await leave(broker, call)
    record = await eventually(lambda: only_stream(sim, ended=True))
    assert record["outcome"] == "sim_disconnected"

    error, events = await failure(broker.stub.Attach(attach_request(request)))
    assert kinds(events) == ["started", "text_delta"]
    assert len(text_of(events).split()) in (19, 20)
    assert error.code() == grpc.StatusCode.ABORTED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_stream_broken"
    assert not broker.servicer.calls.holds(request.tenant_id, request.response_id)


async def test_an_orphan_nobody_attaches_to_is_cancelled_after_the_grace(
    sim: RunningSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.broker")
    async with serving(dev_env(sim.base_url, SWITCHBOARD_BROKER_ORPHAN_GRACE_S="0.5")) as served:
        request = slow(tokens=200, token_delay_ms=50)  # 10 s
        call = served.stub.Generate(request)
        await read(call, 1)
        call.cancel()
        left_at = time.time()
        await orphaned(served)

        # While it is held: another tenant's id looks exactly like an unknown one.
        other_tenant = await not_held(served.stub, attach_request(request, tenant_id="t2"))
        unknown = await not_held(
            served.stub, B.AttachRequest(tenant_id=DEV_TENANT, response_id="resp_unknown")
        )
        assert answer(other_tenant) == answer(unknown)
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert trailers(unknown)[GRPC_CODE_KEY] == "response_interrupted"

        record = await eventually(lambda: only_stream(sim, ended=True), timeout_s=3.0)
        print(f"upstream closed {record['ended_at'] - left_at:.3f} s after the caller left")
        assert record["outcome"] == "client_closed"
        assert 0.45 < record["ended_at"] - left_at < 1.5
        expired = await not_held(served.stub, attach_request(request))
        assert answer(expired) == answer(unknown)

        metrics = served.servicer.metrics
        assert value(metrics.orphans.labels("expired")) == 1
        assert value(metrics.orphaned_requests) == 0
        assert value(metrics.attaches.labels("not_found")) == 3
        upstream = served.tenants.current.upstreams["default"]
        assert served.servicer.dispatcher.admission.queue(upstream).running == 0
    (line,) = [r for r in caplog.records if r.getMessage() == "orphan expired"]
    fields = vars(line)
    assert (fields["tenant_id"], fields["session_id"], fields["response_id"]) == (
        DEV_TENANT,
        "sess_1",
        request.response_id,
    )


async def test_a_call_without_a_response_id_is_cancelled_with_its_caller(
    broker: Served, sim: RunningSimulator
) -> None:
    request = slow(tokens=100, token_delay_ms=50)
    request.response_id = ""
    call = broker.stub.Generate(request)
    await read(call, 2)
    call.cancel()
    cancelled_at = time.time()
    record = await eventually(lambda: only_stream(sim, ended=True))
    assert record["outcome"] == "client_closed"
    assert record["ended_at"] - cancelled_at < 0.1
    assert value(broker.servicer.metrics.orphaned_requests) == 0
    assert (await broker.stub.Cancel(cancel_request(request))).cancelled is False


async def test_a_second_generate_with_the_same_ids_replaces_the_first(
    broker: Served, sim: RunningSimulator
) -> None:
    request = slow(tokens=100, token_delay_ms=50)
    first = broker.stub.Generate(request)
    await read(first, 1)
    again = B.GenerateRequest()
    again.CopyFrom(request)
    again.context.items[0].content[0].text = "hi"
    second = await collect(broker.stub, again)
    assert kinds(second)[-1] == "finished"
    error, _ = await failure(first)
    assert error.code() == grpc.StatusCode.CANCELLED
    outcomes = sorted(r["outcome"] for r in await sim.streams())
    assert outcomes == ["client_closed", "completed"]


async def test_leaving_the_broker_cancels_its_orphans(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as served:
        call = served.stub.Generate(slow(tokens=200, token_delay_ms=50))
        await read(call, 1)
        await leave(served, call)
    stopped_at = time.time()
    record = await eventually(lambda: only_stream(sim, ended=True))
    assert record["outcome"] == "client_closed"
    assert record["ended_at"] - stopped_at < 0.1
    assert value(served.servicer.metrics.orphans.labels("shutdown")) == 1
    assert value(served.servicer.metrics.streams_active) == 0


# ------------------------------------------------------- the transcript's cap


async def test_a_call_past_the_attach_limit_cannot_be_attached_to(sim: RunningSimulator) -> None:
    environ = dev_env(sim.base_url, SWITCHBOARD_BROKER_ATTACH_MAX_BYTES="200")
    async with serving(environ) as served:
        request = slow(tokens=100, token_delay_ms=10)
        call = served.stub.Generate(request)
        seen = await read(call, 60)  # 200 bytes are some 30 tokens
        assert len(text_of(seen).encode()) > 200

        # Followed, it goes on for its caller; nobody else can have it.
        error = await not_held(served.stub, attach_request(request))
        assert trailers(error)[GRPC_CODE_KEY] == "response_interrupted"
        assert await only_stream(sim, ended=False) is not None

        # Orphaned, it is cancelled at once.
        call.cancel()
        left_at = time.time()
        record = await eventually(lambda: only_stream(sim, ended=True))
        assert record["outcome"] == "client_closed"
        assert record["ended_at"] - left_at < 0.1
        assert value(served.servicer.metrics.orphans.labels("too_large")) == 1
        assert not served.servicer.calls.holds(request.tenant_id, request.response_id)


async def test_an_orphan_that_passes_the_attach_limit_is_cancelled(sim: RunningSimulator) -> None:
    environ = dev_env(sim.base_url, SWITCHBOARD_BROKER_ATTACH_MAX_BYTES="200")
    async with serving(environ) as served:
        request = slow(tokens=100, token_delay_ms=10)
        call = served.stub.Generate(request)
        await read(call, 2)
        await leave(served, call)
        record = await eventually(lambda: only_stream(sim, ended=True))
        assert record["outcome"] == "client_closed"
        # Cancelled as it passed 200 bytes (some 30 tokens), long before its 100.
        assert 20 < record["tokens_sent"] < 90
        error = await not_held(served.stub, attach_request(request))
        assert trailers(error)[GRPC_CODE_KEY] == "response_interrupted"
        metrics = served.servicer.metrics
        assert value(metrics.orphans.labels("too_large")) == 1
        assert value(metrics.orphaned_requests) == 0


# ------------------------------------------------------ the broker names itself


async def initial_metadata(call: Any) -> dict[str, str]:
    return {key: value for key, value in await call.initial_metadata()}


async def test_every_call_names_the_advertised_broker_before_its_first_event(
    sim: RunningSimulator,
) -> None:
    environ = dev_env(sim.base_url, SWITCHBOARD_BROKER_ADVERTISE_ADDRESS="10.1.2.3:50052")
    async with serving(environ) as served:
        request = slow(ttft_ms=2000)
        call = served.stub.Generate(request)
        asked_at = time.monotonic()
        named = await initial_metadata(call)
        assert time.monotonic() - asked_at < 1.0  # long before the first token
        assert named[BROKER_METADATA_KEY] == "10.1.2.3:50052"

        attached = served.stub.Attach(attach_request(request))
        assert (await initial_metadata(attached))[BROKER_METADATA_KEY] == "10.1.2.3:50052"
        unknown = served.stub.Attach(B.AttachRequest(tenant_id=DEV_TENANT, response_id="nope"))
        assert (await initial_metadata(unknown))[BROKER_METADATA_KEY] == "10.1.2.3:50052"
        assert (await failure(unknown))[0].code() == grpc.StatusCode.NOT_FOUND
        assert (await served.stub.Cancel(cancel_request(request))).cancelled


@pytest.mark.parametrize(
    ("listen", "named"),
    [("127.0.0.1:50999", "127.0.0.1:50999"), ("0.0.0.0:50999", ""), ("[::]:50999", "")],
)
async def test_the_advertised_address_defaults_to_a_concrete_listen_address(
    sim: RunningSimulator, listen: str, named: str
) -> None:
    # The harness serves on 127.0.0.1:0 whatever the setting: only the name is checked.
    async with serving(dev_env(sim.base_url, SWITCHBOARD_BROKER_LISTEN=listen)) as served:
        call = served.stub.Generate(generate_request(user("hi")))
        assert (await initial_metadata(call))[BROKER_METADATA_KEY] == named
        assert kinds(await rest(call))[-1] == "finished"
