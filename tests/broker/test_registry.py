"""`calls.Calls` on its own: real pumps (coroutines) and followers on the event loop, no gRPC.

What the gRPC tests (test_calls.py) cannot pin down exactly: how far a pump
runs ahead of a follower that does not read, and that an Attach while the
pump waits for room gets every event exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from switchboard.broker.calls import BUFFERED_EVENTS, CallCancelled, Calls, Follower, HeldCall
from switchboard.broker.metrics import BrokerMetrics
from switchboard.errors import SessionTakenOver
from switchboard.v1 import broker_pb2 as B
from tests.broker.harness import eventually, met

TOKENS = 3 * BUFFERED_EVENTS
IDS = {"tenant_id": "t1", "session_id": "sess_1", "response_id": "resp_1"}


def text(i: int) -> B.GenerateEvent:
    return B.GenerateEvent(text_delta=B.TextDelta(text=f" w{i}"))


FINISHED = B.GenerateEvent(finished=B.Finished(reason=B.FINISH_REASON_STOP))
STARTED = B.GenerateEvent(started=B.Started(upstream="sim", upstream_model="m"))
WHOLE = "".join(f" w{i}" for i in range(TOKENS))


class Counting:
    """A pump that publishes Started, TOKENS words (as fast as it may), then Finished."""

    def __init__(self, delay_s: float = 0.0, *, stall_after: int | None = None) -> None:
        self.published = 0
        self.delay_s = delay_s
        # After this many words the pump waits for ever (a model gone quiet).
        self.stall_after = stall_after

    async def __call__(self, call: HeldCall) -> None:
        await call.publish(STARTED)
        for i in range(TOKENS):
            if i == self.stall_after:
                await asyncio.Event().wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            await call.publish(text(i))
            self.published += 1
        await call.publish(FINISHED)


@pytest.fixture
async def calls() -> AsyncIterator[Calls]:
    registry = Calls(orphan_grace_s=60, attach_max_bytes=1 << 20, metrics=BrokerMetrics())
    yield registry
    await registry.aclose()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def take(follower: Follower, count: int) -> list[B.GenerateEvent]:
    return [await anext(follower) for _ in range(count)]


def joined(events: list[B.GenerateEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")


async def test_the_pump_waits_for_a_follower_that_does_not_read(calls: Calls) -> None:
    pump = Counting()
    follower = calls.start(IDS, pump)
    await settle()
    # Started and BUFFERED_EVENTS - 1 words wait; the next word waits for room.
    assert pump.published == BUFFERED_EVENTS - 1
    await take(follower, 10)
    await settle()
    assert pump.published == BUFFERED_EVENTS - 1 + 10

    # Orphaned, the pump reads on to the end, keeping the transcript only.
    follower.detach()
    await settle()
    assert pump.published == TOKENS
    attached = calls.attach("t1", "resp_1")
    assert attached is not None
    events = [event async for event in attached]
    assert events == [STARTED, B.GenerateEvent(text_delta=B.TextDelta(text=WHOLE)), FINISHED]
    assert not calls.holds("t1", "resp_1")


async def test_attach_while_the_pump_waits_for_room_loses_and_doubles_nothing(
    calls: Calls,
) -> None:
    pump = Counting()
    original = calls.start(IDS, pump)
    await settle()
    seen = await take(original, 5)
    await settle()  # the pump filled the queue again and waits
    attached = calls.attach("t1", "resp_1")
    assert attached is not None
    with pytest.raises(SessionTakenOver):
        await anext(original)
    events = [event async for event in attached]
    assert events[0] == STARTED
    assert events[1].text_delta.text.startswith(joined(seen))
    assert joined(events) == WHOLE
    assert events[-1] == FINISHED
    assert not calls.holds("t1", "resp_1")


async def test_cancel_ends_the_follower_and_the_pump(calls: Calls) -> None:
    follower = calls.start(IDS, Counting())
    await take(follower, 3)
    pump = follower.call.pump
    assert await calls.cancel("t1", "resp_1")
    assert pump.cancelled()
    with pytest.raises(CallCancelled):
        await anext(follower)
    assert not await calls.cancel("t1", "resp_1")
    assert calls.attach("t1", "resp_1") is None


@pytest.mark.parametrize("running", [True, False])
async def test_an_orphan_is_dropped_after_its_grace(running: bool) -> None:
    # Running, it is cancelled then; ended meanwhile, it is held, ended, until then.
    metrics = BrokerMetrics()
    calls = Calls(orphan_grace_s=1.0, attach_max_bytes=1 << 20, metrics=metrics)
    try:
        follower = calls.start(IDS, Counting(stall_after=5 if running else None))
        await take(follower, 2)
        follower.detach()
        pump = follower.call.pump
        assert metrics.orphaned_requests._value.get() == 1
        await settle()  # a pump that is not stalled runs to its end
        assert pump.done() is not running
        assert calls.holds("t1", "resp_1")
        await eventually(lambda: met(not calls.holds("t1", "resp_1")), timeout_s=10)
        # Dropped, a running pump was cancelled; it ends on the loop's next turn.
        await asyncio.wait([pump], timeout=5)
        assert pump.cancelled() is running
        assert metrics.orphaned_requests._value.get() == 0
        assert metrics.orphans.labels("expired")._value.get() == 1
    finally:
        await calls.aclose()


async def test_a_call_without_response_id_is_not_held(calls: Calls) -> None:
    follower = calls.start({**IDS, "response_id": ""}, Counting())
    await take(follower, 2)
    assert not calls.holds("t1", "")
    assert calls.attach("t1", "") is None
    follower.detach()
    await settle()
    assert follower.call.pump.cancelled()
