"""The model calls the broker holds, so that a call outlives its caller.

`Calls` is the registry. `Calls.start` runs each Generate call's model call in
a task of its own, the *pump*, as a `HeldCall`, held under (tenant_id,
response_id), and returns its *follower*: the `Follower` that the Generate
call streams. A call has at most one follower:

- **Followed**: the pump hands each event to the follower, waiting while
  `BUFFERED_EVENTS` wait there unread (the backpressure gRPC flow control
  gives a direct read), and records it in the call's `Transcript`.
- **Orphaned**: the follower's caller went away (`Follower.detach`, from the
  gRPC call's done callback: a cancel and a dead caller look the same). The
  pump reads on, keeping only the transcript, for `orphan_grace_s` from the
  orphaning; then it is cancelled (the upstream stream closes, the admission
  slot is released) and the call dropped. A call that ends while orphaned is
  held, with its `Finished` or its error, until the grace passes.
- **Attach** (`Calls.attach`) makes a new follower that starts with the
  transcript's snapshot (and the end, if the call ended) and takes the call
  from the previous follower, which ends with `session_taken_over`. Nothing
  awaits between the snapshot and the switch, so no event is lost or doubled.
- **Cancel** (`Calls.cancel`) cancels the pump at once and drops the call; its
  follower, if any, ends with `CallCancelled`.

A call is dropped when its follower has read it to the end, when it is
cancelled, when its orphan grace passes, when a Generate for the same id
replaces it (the old one is cancelled) and at shutdown (`Calls.aclose`). A
call whose transcript passed `attach_max_bytes` keeps its follower but can no
longer be attached to: orphaned, it is cancelled at once. A Generate without
a response_id is not held: it is cancelled as soon as its follower leaves.

Every state change happens in synchronous code on the event loop; only the
pump's wait for room and the follower's wait for events await. Events are
`events.Event`s: a text delta is its `str` until it is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from switchboard.broker.events import Event, as_event, text_of
from switchboard.broker.metrics import AttachOutcome, BrokerMetrics, OrphanOutcome
from switchboard.broker.transcript import Transcript
from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.v1 import broker_pb2

log = logging.getLogger(__name__)

# Events a follower may have waiting before the pump waits for it.
BUFFERED_EVENTS = 1024
# How long Cancel waits for the cancelled pump to close its upstream stream.
CANCEL_WAIT_S = 1.0

Pump = Callable[["HeldCall"], Coroutine[Any, Any, None]]


class CallCancelled(Exception):
    """The call was cancelled (Cancel, a Generate replacing it, shutdown): nothing more comes."""


class HeldCall:
    """One model call: its pump, what it produced, how it ended, and its follower.

    The pump calls `publish` for each event, `Finished` last, or `fail` once.
    """

    pump: asyncio.Task[None]

    def __init__(self, calls: Calls, ids: dict[str, str], transcript: Transcript | None) -> None:
        self.ids = ids
        self.key = (ids["tenant_id"], ids["response_id"])
        # None: never attachable (not held), or no more (past the cap).
        self.transcript = transcript
        self.follower: Follower | None = None
        self.finished: broker_pb2.GenerateEvent | None = None
        self.error: SwitchboardError | None = None
        self.orphan_timer: asyncio.TimerHandle | None = None
        self._calls = calls
        self._room = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.error is not None

    @property
    def orphaned(self) -> bool:
        return self.orphan_timer is not None

    async def publish(self, event: Event) -> None:
        """Record `event` and hand it to the follower, once the follower has room."""
        while (follower := self.follower) is not None and follower.full:
            self._room.clear()
            await self._room.wait()
        # From here to the hand-over nothing awaits: an Attach sees the event
        # either in the transcript or in its own queue, never in both.
        transcript = self.transcript
        if isinstance(event, str):
            if transcript is not None and not transcript.add_text(event):
                self._unattachable()
        elif event.WhichOneof("event") == "finished":
            self.finished = event
        elif transcript is not None and not transcript.add(event):
            self._unattachable()
        if self.follower is not None:
            self.follower.push(event)

    def fail(self, error: SwitchboardError) -> None:
        """End the call with `error`; its follower raises it after the events before it."""
        self.error = error
        if self.follower is not None:
            self.follower.end(error)

    def has_room(self) -> None:
        """Wake a pump waiting for its follower."""
        self._room.set()

    def _unattachable(self) -> None:
        self.transcript = None
        self._calls._unattachable(self)


class Follower:
    """The reader of a held call: the Generate or Attach call that streams it.

    Iterating it yields the call's events; it ends after `Finished`, or raises
    the call's `SwitchboardError` (after the events before it),
    `SessionTakenOver` (another caller attached) or `CallCancelled`, both at
    once. `detach()` when the caller went away; idempotent.
    """

    def __init__(self, call: HeldCall, events: Iterable[Event]) -> None:
        self.call = call
        self._events: deque[Event] = deque(events)
        self._ready = asyncio.Event()
        self._end: SwitchboardError | None = None  # after the queued events
        self._stop: Exception | None = None  # at once
        self._done = False
        # Called when something new waits (an event, the end): how a multiplexed
        # stream, which takes from many followers without waiting, learns of it.
        self.on_news: Callable[[], None] | None = None

    @property
    def full(self) -> bool:
        return len(self._events) >= BUFFERED_EVENTS

    def push(self, event: Event) -> None:
        self._events.append(event)
        self._news()

    def end(self, error: SwitchboardError) -> None:
        self._end = error
        self._news()

    def stop(self, error: Exception) -> None:
        self._stop = error
        self._events.clear()
        self._news()

    def _news(self) -> None:
        self._ready.set()
        if self.on_news is not None:
            self.on_news()

    def take(self) -> tuple[list[Event], Exception | None, bool]:
        """Without waiting, what iterating would yield now: the waiting events,
        consecutive deltas of one output merged into one (text into one `str`,
        see `same_output`), then the end if it came. Returns (events, error,
        ended): `ended` after `Finished`, or with the `error` iterating would raise."""
        if self._stop is not None:
            self._done = True
            return [], self._stop, True
        if self._done:
            return [], None, True
        events: list[Event] = []
        texts: list[str] = []  # consecutive text deltas, joined when they end
        merged = False  # whether events[-1] is a copy of ours, to merge into
        queued = self._events
        while queued:
            event = queued.popleft()
            text = text_of(event)
            if text is not None:
                texts.append(text)
                continue
            if texts:
                events.append("".join(texts))
                texts = []
            message = as_event(event)
            if message.WhichOneof("event") == "finished":
                events.append(message)
                self._done = True
                break
            last = events[-1] if events else None
            if last is not None and not isinstance(last, str) and same_output(last, message):
                if not merged:
                    last = events[-1] = copy_event(last)
                    merged = True
                append_delta(last, message)
            else:
                events.append(message)
                merged = False
        if texts:
            events.append("".join(texts))
        self.call.has_room()
        error = None
        if not self._done and not queued and self._end is not None:
            self._done = True
            error = self._end
        if self._done:
            self.call._calls._read_to_end(self)
        return events, error, self._done

    def detach(self) -> None:
        self.call._calls.detach(self)

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> broker_pb2.GenerateEvent:
        while True:
            if self._stop is not None:
                raise self._stop
            if self._done:
                raise StopAsyncIteration
            if self._events:
                event = as_event(self._events.popleft())
                self.call.has_room()
                if event.WhichOneof("event") == "finished":
                    self._done = True
                    self.call._calls._read_to_end(self)
                return event
            if self._end is not None:
                self._done = True
                self.call._calls._read_to_end(self)
                raise self._end
            self._ready.clear()
            await self._ready.wait()


def same_output(last: broker_pb2.GenerateEvent, event: broker_pb2.GenerateEvent) -> bool:
    """Whether `event` continues `last`'s output: text after text, or argument
    fragments of the same tool call (its id and name come with the first)."""
    kind = event.WhichOneof("event")
    if kind != last.WhichOneof("event"):
        return False
    if kind == "text_delta":
        return True
    if kind == "tool_call_delta":
        delta = event.tool_call_delta
        return delta.index == last.tool_call_delta.index and not (delta.call_id or delta.name)
    return False


def copy_event(event: broker_pb2.GenerateEvent) -> broker_pb2.GenerateEvent:
    copy = broker_pb2.GenerateEvent()
    copy.CopyFrom(event)
    return copy


def append_delta(into: broker_pb2.GenerateEvent, event: broker_pb2.GenerateEvent) -> None:
    """Append a delta of the same output (`same_output`) to `into`."""
    if event.WhichOneof("event") == "text_delta":
        into.text_delta.text += event.text_delta.text
    else:
        into.tool_call_delta.arguments += event.tool_call_delta.arguments


class Calls:
    """The registry of held calls; see the module docstring."""

    def __init__(
        self, *, orphan_grace_s: float, attach_max_bytes: int, metrics: BrokerMetrics
    ) -> None:
        self.orphan_grace_s = orphan_grace_s
        self.attach_max_bytes = attach_max_bytes
        self._metrics = metrics
        self._held: dict[tuple[str, str], HeldCall] = {}
        self._running: set[HeldCall] = set()  # every call whose pump runs, held or not

    def holds(self, tenant_id: str, response_id: str) -> bool:
        """Whether the call is held (running, or ended and orphaned)."""
        return (tenant_id, response_id) in self._held

    def start(self, ids: dict[str, str], pump: Pump) -> Follower:
        """Run `pump` as a new call with these ids; the caller's follower.

        `ids` are tenant_id, session_id and response_id (for the log lines);
        with a response_id the call is held, replacing one held under the same
        ids (which is cancelled).
        """
        held = bool(ids["response_id"])
        call = HeldCall(self, ids, Transcript(self.attach_max_bytes) if held else None)
        if held:
            previous = self._held.get(call.key)
            if previous is not None:
                log.info("call replaced", extra=previous.ids)
                self._kill(previous, "replaced")
            self._held[call.key] = call
        follower = call.follower = Follower(call, ())
        call.pump = asyncio.create_task(pump(call))
        self._running.add(call)
        call.pump.add_done_callback(lambda _task: self._pump_ended(call))
        return follower

    def attach(self, tenant_id: str, response_id: str) -> Follower | None:
        """A new follower of the call, or None when no attachable call is held.

        The follower starts with the call's snapshot and its end, if it ended;
        the previous follower ends with `session_taken_over`.
        """
        call = self._held.get((tenant_id, response_id))
        if call is None or call.transcript is None:
            self._attached("not_found")
            return None
        events = call.transcript.snapshot()
        if call.finished is not None:
            events.append(call.finished)
        follower = Follower(call, events)
        if call.error is not None:
            follower.end(call.error)
        previous, call.follower = call.follower, follower
        call.has_room()
        if previous is not None:
            previous.stop(SessionTakenOver("Another caller attached to this response."))
            self._attached("taken_over")
        else:
            self._adopt(call, "attached")
            self._attached("orphan")
        log.info("call attached", extra={**call.ids, "taken_over": previous is not None})
        return follower

    async def cancel(self, tenant_id: str, response_id: str) -> bool:
        """Cancel the held call and drop it; False when none is held.

        Returns once its pump has ended (its upstream stream is closed and its
        admission slot released), or after `CANCEL_WAIT_S` at most.
        """
        call = self._held.get((tenant_id, response_id))
        if call is None:
            return False
        log.info("call cancelled", extra={**call.ids, "orphaned": call.orphaned})
        self._kill(call, "cancelled")
        await asyncio.wait([call.pump], timeout=CANCEL_WAIT_S)
        return True

    def detach(self, follower: Follower) -> None:
        """The follower's caller went away: orphan its call (see the module docstring)."""
        call = follower.call
        if call.follower is not follower:
            return  # it read the call to the end, was taken over, or already left
        call.follower = None
        call.has_room()  # a pump waiting for this follower reads on
        if self._held.get(call.key) is not call:
            self._kill(call, None)  # not held: cancelled with its caller
        elif call.transcript is None:
            log.info("call orphaned past the attach limit, cancelled", extra=call.ids)
            self._count_orphan("too_large")
            self._kill(call, None)
        else:
            loop = call.pump.get_loop()
            call.orphan_timer = loop.call_later(self.orphan_grace_s, self._expire, call)
            self._metrics.orphaned_requests.inc()
            log.info("call orphaned", extra={**call.ids, "grace_s": self.orphan_grace_s})

    async def aclose(self) -> None:
        """Cancel every call, orphans included, and wait for their pumps to end."""
        calls = {*self._held.values(), *self._running}
        if calls:
            log.info("cancelling held calls at shutdown", extra={"calls": len(calls)})
        for call in calls:
            self._kill(call, "shutdown")
        if calls:
            await asyncio.wait([call.pump for call in calls])

    # -------------------------------------------------------------- internals

    def _read_to_end(self, follower: Follower) -> None:
        call = follower.call
        if call.follower is follower:
            call.follower = None
        if self._held.get(call.key) is call:
            del self._held[call.key]

    def _unattachable(self, call: HeldCall) -> None:
        """The call's transcript passed the cap: an orphan is cancelled at once."""
        log.info(
            "call past the attach limit", extra={**call.ids, "max_bytes": self.attach_max_bytes}
        )
        if call.orphaned:
            self._kill(call, "too_large")

    def _expire(self, call: HeldCall) -> None:
        log.info("orphan expired", extra={**call.ids, "ended": call.ended})
        self._kill(call, "expired")

    def _attached(self, outcome: AttachOutcome) -> None:
        self._metrics.attaches.labels(outcome).inc()

    def _count_orphan(self, outcome: OrphanOutcome) -> None:
        self._metrics.orphans.labels(outcome).inc()

    def _adopt(self, call: HeldCall, outcome: OrphanOutcome) -> None:
        """The call stops being an orphan, for `outcome`."""
        if call.orphan_timer is None:
            return
        call.orphan_timer.cancel()
        call.orphan_timer = None
        self._metrics.orphaned_requests.dec()
        self._count_orphan(outcome)

    def _kill(self, call: HeldCall, outcome: OrphanOutcome | None) -> None:
        """Cancel the call's pump, drop the call and end its follower; idempotent.

        `outcome` is what became of it, counted if it was an orphan.
        """
        if self._held.get(call.key) is call:
            del self._held[call.key]
        if outcome is not None:
            self._adopt(call, outcome)
        call.pump.cancel()
        follower, call.follower = call.follower, None
        if follower is not None:
            follower.stop(CallCancelled("The call was cancelled."))

    def _pump_ended(self, call: HeldCall) -> None:
        self._running.discard(call)
        if not call.pump.cancelled() and call.pump.exception() is not None:
            log.error("call pump failed", extra=call.ids, exc_info=call.pump.exception())
        if not call.ended:
            # Cancelled: by `_kill`, which already did the rest, or by the loop itself.
            self._kill(call, "cancelled")
