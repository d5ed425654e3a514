"""The sending half of a voice session: server events waiting for the client.

Unlike the text path's outbox (outbox.py), nothing here is ever merged: an
audio delta is a chunk the client plays as it comes, and two of them merged
would be a different chunk. A client that falls `max_bytes` behind is cut
(`SlowConsumer`), which the connection turns into 4008 `slow_consumer`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from switchboard.errors import SwitchboardError

_EVENT_IDS = itertools.count(1)


def _event_id() -> str:
    return f"event_sbv{next(_EVENT_IDS):09d}"


def error_event(error: SwitchboardError, client_event_id: Any = None) -> str:
    """A Realtime `error` event for `error`, as JSON text."""
    event_id = client_event_id if isinstance(client_event_id, str) else None
    body = {"type": "error", "event_id": _event_id(), "error": error.to_event_error(event_id)}
    return orjson.dumps(body).decode()


def local_event(kind: str, *, after: Any = None, **fields: Any) -> str:
    """An event the gateway makes (not the upstream's), as JSON text. Its id is
    `event_sbv<n>`, placed after the last upstream event by `ResumeState.local_ids`,
    or `<after>_sbv<n>` when it follows the upstream event whose id is `after`."""
    event_id = _event_id()
    if isinstance(after, str) and after:
        event_id = f"{after}_sbv{event_id.removeprefix('event_sbv')}"
    return orjson.dumps({"type": kind, "event_id": event_id, **fields}).decode()


class SlowConsumer(Exception):
    """The client fell further behind than the outbox may hold."""


@dataclass(slots=True)
class _Waiting:
    text: str
    # The response whose first audio this is (for time to first audio), or "".
    first_audio_of: str = ""


class VoiceOutbox:
    """Server events waiting for the client, in order, never merged, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: deque[_Waiting] = deque()
        self._ready = asyncio.Event()

    def put(self, text: str, first_audio_of: str = "") -> None:
        """Queue one event.

        Raises:
            SlowConsumer: it would take the waiting events past `max_bytes`.
        """
        if self.size + len(text) > self.max_bytes:
            raise SlowConsumer(f"{self.size} bytes waiting")
        self.size += len(text)
        self._items.append(_Waiting(text, first_audio_of))
        self._ready.set()

    async def get(self) -> _Waiting:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self.size -= len(item.text)
        return item
