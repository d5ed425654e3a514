"""Many model calls over one `Stream`: the broker's side (multiplex.py) and the
gateway's (gateway/broker_stream.py) through a real grpc.aio server, against
the real upstream simulator; and `Follower.take`, which merges what it takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from switchboard.broker.calls import Calls, Follower, HeldCall
from switchboard.broker.events import Event, as_event
from switchboard.broker.metrics import BrokerMetrics
from switchboard.errors import SwitchboardError
from switchboard.gateway.broker_stream import BrokerStream, StreamedCall
from switchboard.v1 import common_pb2
from tests.broker.harness import (
    DEV_TENANT,
    B,
    dev_env,
    directive,
    eventually,
    generate_request,
    kinds,
    met,
    serving,
    text_of,
    user,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=5, token_delay_ms=2, reply_tokens=12)
    async with run_simulator(config) as running_sim:
        yield running_sim


async def events_of(call: StreamedCall) -> list[B.GenerateEvent]:
    return [event async for event in call]


async def test_calls_share_one_stream_and_each_gets_its_whole_reply(
    sim: RunningSimulator,
) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        requests = [
            generate_request(user(f"question {n} {directive(tokens=30)}")) for n in range(5)
        ]
        calls = [stream.generate(request) for request in requests]
        replies = await asyncio.gather(*(events_of(call) for call in calls))
        for n, events in enumerate(replies):
            assert kinds(events)[0] == "started"
            assert kinds(events)[-1] == "finished"
            assert events[-1].finished.usage.output_tokens == 30
            text = text_of(events)
            assert text.startswith(f'turn 1: you said "question {n}".')
            assert len(text.split()) == 30
        assert await calls[0].broker() == servicer._named[0][1]
        assert not servicer.calls._held  # each call read to its end is dropped
        await stream.close()


async def test_a_failing_call_fails_alone_with_its_error(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, _, _):
        stream = BrokerStream(stub, "broker:0")
        good = stream.generate(generate_request(user(f"fine {directive(tokens=20)}")))
        bad = stream.generate(generate_request(user("no model"), model=""))
        with pytest.raises(SwitchboardError) as failed:
            await events_of(bad)
        assert failed.value.name == "missing_required_parameter"
        assert failed.value.param == "model"
        assert len(text_of(await events_of(good)).split()) == 20
        await stream.close()


async def test_a_followed_call_hands_every_event_over_from_the_streams_reader(
    sim: RunningSimulator,
) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, _, _):
        stream = BrokerStream(stub, "broker:0")
        request = generate_request(user(f"followed {directive(tokens=30)}"))
        iterated = stream.generate(request)
        followed = stream.generate(generate_request(user(f"followed {directive(tokens=30)}")))
        handed: list[B.GenerateEvent] = []
        tasks: set[asyncio.Task[object] | None] = set()

        def handle(event: B.GenerateEvent) -> None:
            handed.append(event)
            tasks.add(asyncio.current_task())

        follower = asyncio.ensure_future(followed.follow(handle))
        expected = await events_of(iterated)
        await follower
        # The same reply (the broker merges deltas as they wait, so how many
        # deltas carry it may differ between the two calls).
        assert kinds(handed)[0] == "started" and kinds(handed)[-1] == "finished"
        assert set(kinds(handed)[1:-1]) == {"text_delta"}
        assert text_of(handed) == text_of(expected)
        assert handed[-1].finished.usage == expected[-1].finished.usage
        # The follower's task was not woken per event: the reader handed them.
        assert follower not in tasks
        await stream.close()


async def test_a_followed_call_raises_its_error_or_what_its_handler_raised(
    sim: RunningSimulator,
) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        bad = stream.generate(generate_request(user("no model"), model=""))
        with pytest.raises(SwitchboardError) as failed:
            await bad.follow(lambda event: None)
        assert failed.value.name == "missing_required_parameter"

        request = generate_request(user(f"long {directive(tokens=40, token_delay_ms=5)}"))
        call = stream.generate(request)
        handed: list[B.GenerateEvent] = []

        def handle(event: B.GenerateEvent) -> None:
            handed.append(event)
            if event.WhichOneof("event") == "text_delta":
                raise ValueError("a bug in the handler")

        with pytest.raises(ValueError, match="a bug in the handler"):
            await call.follow(handle)
        assert kinds(handed)[-1] == "text_delta"
        assert kinds(handed).count("text_delta") == 1  # nothing handed after it raised
        call.cancel()  # leave: the broker keeps the call for a resume
        await asyncio.sleep(0.05)
        assert servicer.calls.holds(DEV_TENANT, request.response_id)
        # The stream goes on serving the other calls.
        good = stream.generate(generate_request(user(f"fine {directive(tokens=20)}")))
        assert len(text_of(await events_of(good)).split()) == 20
        await stream.close()


async def test_leaving_orphans_the_call_and_an_attach_gets_all_of_it(
    sim: RunningSimulator,
) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        request = generate_request(user(f"long {directive(tokens=40, token_delay_ms=5)}"))
        call = stream.generate(request)
        seen = []
        async for event in call:
            seen.append(event)
            if event.WhichOneof("event") == "text_delta":
                break
        call.cancel()  # leave: the broker keeps the call for a resume
        await asyncio.sleep(0.05)
        assert servicer.calls.holds(DEV_TENANT, request.response_id)
        attached = stream.attach(
            B.AttachRequest(tenant_id=DEV_TENANT, response_id=request.response_id)
        )
        events = await events_of(attached)
        assert kinds(events)[0] == "started"
        assert kinds(events)[-1] == "finished"
        # The attach starts from the merged snapshot: what was seen is its beginning.
        assert text_of(events).startswith(text_of(seen))
        assert len(text_of(events).split()) == 40
        await stream.close()


async def test_an_attach_to_nothing_held_is_response_interrupted(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, _, _):
        stream = BrokerStream(stub, "broker:0")
        call = stream.attach(B.AttachRequest(tenant_id=DEV_TENANT, response_id="resp_none"))
        with pytest.raises(SwitchboardError) as failed:
            await events_of(call)
        assert failed.value.name == "response_interrupted"
        await stream.close()


async def test_a_broker_that_goes_away_fails_its_calls_and_the_next_opens_anew(
    sim: RunningSimulator,
) -> None:
    environ = dev_env(sim.base_url)
    async with serving(environ) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        call = stream.generate(
            generate_request(user(f"slow {directive(tokens=100, token_delay_ms=50)}"))
        )
        first = await anext(aiter(call))
        assert first.WhichOneof("event") == "started"
        await servicer.calls.aclose()  # every call cancelled, as at the broker's shutdown
        with pytest.raises(SwitchboardError) as failed:
            await events_of(call)
        assert failed.value.name == "service_unavailable"
        # The stream itself is still up: a new call runs on it.
        again = stream.generate(generate_request(user(f"again {directive(tokens=5)}")))
        assert len(text_of(await events_of(again)).split()) == 5
        await stream.close()


async def test_a_draining_broker_finishes_its_calls_refuses_new_ones_and_ends_the_stream(
    sim: RunningSimulator,
) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        running = stream.generate(
            generate_request(user(f"long {directive(tokens=20, token_delay_ms=20)}"))
        )
        assert (await anext(aiter(running))).WhichOneof("event") == "started"
        servicer.drain()  # what SIGTERM does, before the server waits for its calls
        await asyncio.sleep(0.05)
        # A new call goes on a new stream, which this broker, draining, refuses.
        late = stream.generate(generate_request(user("late")))
        with pytest.raises(SwitchboardError) as refused:
            await events_of(late)
        assert refused.value.name == "service_unavailable"
        # The running call ends as it would have...
        events = await events_of(running)
        assert kinds(events)[-1] == "finished"
        assert len(text_of(events).split()) == 20
        # ...and then the broker ends its streams: nothing keeps the drain waiting.
        await eventually(lambda: met(not servicer._streams))
        await stream.close()


async def test_calls_started_together_go_out_in_one_message(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, _, _):
        stream = BrokerStream(stub, "broker:0")
        first = stream.generate(generate_request(user(f"first {directive(tokens=3)}")))
        opened = first._opened
        written: list[int] = []
        write = opened.call.write

        async def counted(message: B.StreamRequests) -> None:
            written.append(len(message.requests))
            await write(message)

        opened.call.write = counted  # type: ignore[method-assign]
        # Twenty more in the same turn of the loop: the writer, which has not
        # run yet, takes all that waits into one message.
        calls = [first] + [
            stream.generate(generate_request(user(f"q{n} {directive(tokens=3)}")))
            for n in range(20)
        ]
        replies = await asyncio.gather(*(events_of(call) for call in calls))
        assert all(kinds(events)[-1] == "finished" for events in replies)
        assert written[0] == 21, written
        await stream.close()


async def test_a_call_number_in_use_is_refused(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, _, _):
        requests: asyncio.Queue[B.StreamRequests] = asyncio.Queue()

        async def send() -> AsyncIterator[B.StreamRequests]:
            while True:
                yield await requests.get()

        call = stub.Stream(send())
        slow = generate_request(user(f"a {directive(tokens=50, token_delay_ms=20)}"))
        requests.put_nowait(B.StreamRequests(requests=[B.StreamRequest(call=7, generate=slow)]))
        again = B.StreamRequest(call=7, generate=generate_request(user("b")))
        requests.put_nowait(B.StreamRequests(requests=[again]))
        failure = None
        async for response in call:
            for entry in response.calls:
                if entry.HasField("failure"):
                    failure = entry.failure
            if failure is not None:
                break
        assert failure is not None
        assert failure.code == common_pb2.ERROR_CODE_INVALID_VALUE
        assert failure.param == "call"
        call.cancel()


async def test_the_stream_ending_orphans_its_calls(sim: RunningSimulator) -> None:
    async with serving(dev_env(sim.base_url)) as (stub, servicer, _):
        stream = BrokerStream(stub, "broker:0")
        request = generate_request(user(f"on {directive(tokens=100, token_delay_ms=2)}"))
        call = stream.generate(request)
        await anext(aiter(call))
        await stream.close()  # the gateway goes away
        await asyncio.sleep(0.1)
        assert servicer.calls.holds(DEV_TENANT, request.response_id)
        assert servicer.metrics.orphaned_requests._value.get() == 1
        attach = B.AttachRequest(tenant_id=DEV_TENANT, response_id=request.response_id)
        events = [event async for event in stub.Attach(attach)]
        assert kinds(events)[-1] == "finished"
        assert len(text_of(events).split()) == 100


# ------------------------------------------------------- Follower.take (pure)


def follower_with(*events: Event) -> tuple[Calls, Follower]:
    calls = Calls(orphan_grace_s=1.0, attach_max_bytes=1 << 20, metrics=BrokerMetrics())
    call = HeldCall(calls, {"tenant_id": "t", "response_id": "r", "session_id": "s"}, None)
    follower = call.follower = Follower(call, events)
    return calls, follower


def text(t: str) -> B.GenerateEvent:
    return B.GenerateEvent(text_delta=B.TextDelta(text=t))


def fragment(index: int, arguments: str, call_id: str = "", name: str = "") -> B.GenerateEvent:
    delta = B.ToolCallDelta(index=index, call_id=call_id, name=name, arguments=arguments)
    return B.GenerateEvent(tool_call_delta=delta)


def test_take_merges_consecutive_deltas_of_one_output() -> None:
    started = B.GenerateEvent(started=B.Started(upstream="u"))
    queued = [
        started,
        text("a"),
        text("b"),
        text("c"),
        fragment(0, '{"ci', call_id="call_1", name="f"),
        fragment(0, 'ty":'),
        fragment(0, '"x"}'),
        fragment(1, "{", call_id="call_2", name="g"),
        fragment(0, " "),  # another call in between: not merged across it
        fragment(1, "}"),
    ]
    _, follower = follower_with(*queued)
    events, error, ended = follower.take()
    assert (error, ended) == (None, False)
    assert events[1] == "abc"  # text stays a str until the stream's message is built
    assert [as_event(event) for event in events] == [
        started,
        text("abc"),
        fragment(0, '{"city":"x"}', call_id="call_1", name="f"),
        fragment(1, "{", call_id="call_2", name="g"),
        fragment(0, " "),
        fragment(1, "}"),
    ]
    # What was queued is not changed: the merge is into a copy.
    assert queued[1] == text("a")
    assert follower.take() == ([], None, False)


def test_take_merges_text_as_published_and_as_a_snapshot_holds_it() -> None:
    # The pump publishes text deltas as str; an Attach's snapshot holds a TextDelta.
    tool = fragment(0, "{}", call_id="call_1", name="f")
    _, follower = follower_with(text("Hel"), "lo", ", ", tool, "wor", text("ld"))
    events, error, ended = follower.take()
    assert (events, error, ended) == (["Hello, ", tool, "world"], None, False)
    assert [as_event(event) for event in events] == [text("Hello, "), tool, text("world")]


def test_take_ends_after_finished_or_with_the_error_after_the_events() -> None:
    finished = B.GenerateEvent(finished=B.Finished(reason=B.FINISH_REASON_STOP))
    _, follower = follower_with("a", finished)
    assert follower.take() == (["a", finished], None, True)

    _, follower = follower_with("a", "b")
    error = SwitchboardError("upstream broke", code=common_pb2.ERROR_CODE_UPSTREAM_ERROR)
    follower.end(error)
    assert follower.take() == (["ab"], error, True)


def test_news_is_announced_for_each_event_and_the_end() -> None:
    _, follower = follower_with()
    news: list[int] = []
    follower.on_news = lambda: news.append(1)
    follower.push("a")
    follower.end(SwitchboardError("x", code=common_pb2.ERROR_CODE_UPSTREAM_ERROR))
    assert len(news) == 2
