"""Server events waiting to be written to one client, bounded, merging deltas.

A client that reads slower than the model writes falls behind. While a text (or
function-call arguments) delta waits unsent at the tail of the outbox, the next
delta of the same item is appended to it instead of queued: the client gets
fewer, larger events, with no text lost and the order kept. The merged event
takes the id of the last delta in it, whose output offset (ids.py) then says
how much of the output the client has. When what waits
still grows past `max_bytes`, `put` raises `SlowConsumer` and the connection is
closed (a documented, resumable close), so one slow client never holds more
than `max_bytes` of the gateway's memory or slows the stream of another.

The producer never waits on the client: generation runs at the model's pace.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from switchboard.gateway.responses import UNSENT

Event = dict[str, Any]

# Deltas that may be merged: two merge when their `item_id` and (for text)
# `content_index` match.
_MERGEABLE = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})
# Rough size of a delta event besides its text, for the byte budget.
_DELTA_OVERHEAD = 192


@dataclass(slots=True)
class _Entry:
    event: Event
    # The serialized event; None for a delta, which may still grow by merging.
    data: bytes | None
    size: int


@dataclass(frozen=True, slots=True)
class Close:
    """The end of the outbox: close the connection with this code once sent."""

    code: int
    reason: str


class SlowConsumer(Exception):
    """The client fell behind by more than the outbox may hold."""


class Outbox:
    """A FIFO of server events between the protocol and the connection's writer."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.merged = 0
        self._queue: deque[_Entry] = deque()
        self._ready = asyncio.Event()
        self.aborted = False
        self._close: Close | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, event: Event) -> None:
        """Queue an event, merging it into an unsent delta of the same item.

        Raises:
            SlowConsumer: what waits would exceed `max_bytes`.
        """
        if self.aborted or self._close is not None:
            return
        unsent = UNSENT in event
        # Recorded, never sent: never merged with what the client is sent.
        mergeable = not unsent and event["type"] in _MERGEABLE
        tail = self._queue[-1] if self._queue else None
        if (
            mergeable
            and tail is not None
            and tail.data is None
            and tail.event["type"] == event["type"]
            and tail.event["item_id"] == event["item_id"]
            and tail.event.get("content_index") == event.get("content_index")
        ):
            delta = event["delta"]
            tail.event["delta"] += delta
            tail.event["event_id"] = event["event_id"]
            tail.size += len(delta)
            self.size += len(delta)
            self.merged += 1
        else:
            if mergeable:
                entry = _Entry(event, None, _DELTA_OVERHEAD + len(event["delta"]))
            else:
                data = orjson.dumps(
                    {k: v for k, v in event.items() if k != UNSENT} if unsent else event
                )
                entry = _Entry(event, data, len(data))
            self.size += entry.size
            self._queue.append(entry)
            self._ready.set()
        # The event is queued either way: the connection decides what a slow
        # client costs it (it is cut, and what waits is still recorded).
        if self.size > self.max_bytes:
            raise SlowConsumer(f"more than {self.max_bytes} bytes of events waiting")

    @property
    def ended(self) -> bool:
        """Closing or aborted: nothing more will be queued."""
        return self.aborted or self._close is not None

    def close(self, code: int, reason: str) -> None:
        """Send what waits, then close the connection with `code`; later puts are dropped."""
        if self._close is None and not self.aborted:
            self._close = Close(code, reason)
            self._ready.set()

    def abort(self) -> None:
        """Drop what waits and make `get` return None: the connection is closing."""
        self.aborted = True
        self._queue.clear()
        self.size = 0
        self._ready.set()

    async def get_batch(
        self, max_events: int = 256, *, deadline: float | None = None
    ) -> list[tuple[Event, bytes]] | Close | None:
        """Up to `max_events` of the oldest events, each with its JSON (UTF-8); waits
        for one, or until the event loop's clock passes `deadline` (then an empty
        batch). After the last event of a closing outbox, its `Close`; None once
        aborted. (A batch lets the writer record many events in one round trip.)"""
        timer: asyncio.TimerHandle | None = None
        try:
            while not self._queue:
                if self.aborted:
                    return None
                if self._close is not None:
                    return self._close
                if deadline is not None:
                    loop = asyncio.get_running_loop()
                    if loop.time() >= deadline:
                        return []
                    if timer is None:
                        timer = loop.call_at(deadline, self._ready.set)
                self._ready.clear()
                await self._ready.wait()
        finally:
            if timer is not None:
                timer.cancel()
        batch = []
        for _ in range(min(max_events, len(self._queue))):
            entry = self._queue.popleft()
            self.size -= entry.size
            data = entry.data if entry.data is not None else orjson.dumps(entry.event)
            batch.append((entry.event, data))
        return batch
