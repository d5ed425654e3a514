"""`MemorySocket`: a client's WebSocket in memory, and a polling helper."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Event = dict[str, Any]


class MemorySocket:
    """A client's WebSocket, in memory, in the shape the connection uses.

    The test `send`s events and `leave`s; it reads what the gateway sent with
    `next_event`. `pause()` stops the client reading (the gateway's sends wait,
    as on a full socket) until `resume()`.
    """

    def __init__(self) -> None:
        self._incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outgoing: asyncio.Queue[Event] = asyncio.Queue()
        self.sent: list[Event] = []
        self.closed: tuple[int, str | None] | None = None
        self._reading = asyncio.Event()
        self._reading.set()
        self._closed = asyncio.Event()

    # the gateway's side
    async def receive(self) -> dict[str, Any]:
        return await self._incoming.get()

    async def send_text(self, data: str) -> None:
        await self._reading.wait()
        if self.closed is not None:
            raise RuntimeError("the socket is closed")
        event = orjson.loads(data)
        self.sent.append(event)
        self._outgoing.put_nowait(event)

    async def send_json(self, data: Any, mode: str = "text") -> None:
        await self.send_text(orjson.dumps(data).decode())

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self._reading.wait()  # a close frame waits behind what the client has not read
        if self.closed is None:
            self.closed = (code, reason)
            self._closed.set()

    # the test's side
    def send(self, event: Event) -> None:
        self._incoming.put_nowait(
            {"type": "websocket.receive", "text": orjson.dumps(event).decode()}
        )

    def send_raw(self, text: str | None = None, data: bytes | None = None) -> None:
        self._incoming.put_nowait({"type": "websocket.receive", "text": text, "bytes": data})

    def leave(self) -> None:
        self._incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    async def next_event(self, event_type: str | None = None, timeout_s: float = 5.0) -> Event:
        """The next event the gateway sent (of `event_type`, skipping others)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self._outgoing.get()
                if event_type is None or event["type"] == event_type:
                    return event

    async def until(self, event_type: str, timeout_s: float = 5.0) -> list[Event]:
        """Every event sent up to and including the next one of `event_type`."""
        events: list[Event] = []
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self._outgoing.get()
                events.append(event)
                if event["type"] == event_type:
                    return events

    async def wait_closed(self, timeout_s: float = 5.0) -> tuple[int, str | None]:
        async with asyncio.timeout(timeout_s):
            await self._closed.wait()
        assert self.closed is not None
        return self.closed


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0, poll_s: float = 0.005
) -> None:
    """Wait until `check()` is true (a test helper; raises TimeoutError)."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(poll_s)
