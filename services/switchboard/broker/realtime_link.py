"""The upstream end of a voice session as one socket that outlives upstream sessions.

`RealtimeLink` has the methods of the `RealtimeSocket` (realtime_upstream.py)
that realtime_session.py uses (`recv(decode=False)`, `send(message, text=True)`,
`close()`) and owns the current upstream socket. Every event through it is
shown to a `Carried` (realtime_carry.py), which keeps the session's
configuration and items. When the upstream has a session limit
(`rollover.session_limit_s` in the tenants file), **rollover**: from
`margin_s` before the limit, at a moment between turns, the link

1. opens a new upstream socket (the same upstream, model and credentials),
   applies the session as it stands with one `session.update`, and replays the
   conversation with `conversation.item.create` events that keep the item ids,
   reading and dropping every answer on that socket, up to a barrier (below);
2. holds the client's next events back and sends a **barrier** on the old
   socket: a `conversation.item.retrieve` of an id no item has, whose `error`
   answer comes after every answer to what was sent before it;
3. when the barrier's answer arrives in `recv()` and the session is still
   between turns and unchanged since step 1, swaps the sockets (the old one is
   closed), and lets the held events go to the new one.

The client sees none of it: no `session.created`, no `error`, its events in
order. A failed step 1 keeps the old socket and is retried every
`min(5 s, margin_s / 4)`; a session that changed meanwhile is prepared again.
If the upstream's limit ends the old session first, its `error` goes to the
client and `recv()` raises `UpstreamClosed`, as without rollover.
docs/voice.md#session-rollover is the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import orjson

from switchboard.broker.realtime_carry import Carried, watched
from switchboard.broker.realtime_upstream import RealtimeSocket, UpstreamClosed
from switchboard.errors import SwitchboardError, UpstreamStreamBroken
from switchboard.tenancy import UpstreamRollover

log = logging.getLogger(__name__)

# An item id no conversation holds: retrieving it is answered with an error.
BARRIER_ITEM: Final = "item_switchboard_barrier"
MAX_RETRY_S: Final = 5.0
_APPEND: Final = b'"input_audio_buffer.append"'


class RealtimeLink:
    """One voice session's upstream socket, rolled over before the upstream's limit.

    Args:
        socket: the open upstream socket (its `session.created` not read yet).
        reopen: opens another socket to the same upstream and model.
        rollover: the upstream's session limit and margin; no limit, no rollover.
        timeout_s: the longest opening and filling a new session, or a barrier, may take.
        counted: called with `completed` or `failed` after each rollover attempt.
        log_extra: the session's ids, for log lines.
    """

    def __init__(
        self,
        socket: RealtimeSocket,
        *,
        reopen: Callable[[], Awaitable[RealtimeSocket]],
        rollover: UpstreamRollover,
        timeout_s: float,
        counted: Callable[[str], None],
        log_extra: Mapping[str, str],
    ) -> None:
        self.carried = Carried()
        self._socket = socket
        self._reopen = reopen
        self._timeout_s = timeout_s
        self._counted = counted
        self._log_extra = dict(log_extra)
        self._ids = itertools.count(1)
        # Client events wait here while a barrier is out.
        self._gate = asyncio.Event()
        self._gate.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._barrier: str | None = None
        self._barrier_answered = asyncio.Event()
        self._fresh: RealtimeSocket | None = None
        self._fresh_version = -1
        self._fresh_spoken: set[str] = set()
        # Events the link sent itself: the errors they cause go nowhere...
        self._silent: set[str] = set()
        # ... or to the client, under the id of the client event they stand for.
        self._on_behalf: dict[str, str | None] = {}
        # (type, item id) of upstream answers to the link's own events: dropped,
        # or replaced by the bytes given.
        self._swallow: dict[tuple[str, str], bytes | None] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        limit = rollover.session_limit_s
        # Without a limit nothing is watched: the link is the socket.
        self._rolls = limit is not None
        if limit is not None:
            self._task = asyncio.create_task(self._roll(limit, rollover.margin_s))

    # -- the socket's interface ------------------------------------------------------

    async def recv(self, decode: bool = False) -> bytes:
        """The next upstream event for the client (bytes; `decode` is ignored).

        Raises:
            UpstreamClosed: the upstream session ended.
        """
        while True:
            frame = await self._socket.recv(decode=False)
            if not self._rolls or not watched(frame):
                return frame
            try:
                event = orjson.loads(frame)
            except orjson.JSONDecodeError:
                return frame
            if not isinstance(event, dict):
                return frame
            self.carried.observe(event)
            self._note_idle()
            out = self._filter(event, frame)
            if out is not None:
                return out

    async def send(self, message: bytes | str, text: bool = True) -> None:
        """Send one client event upstream (held while a rollover's barrier is out)."""
        if not self._gate.is_set():
            await self._gate.wait()
        data = message.encode() if isinstance(message, str) else message
        if not self._rolls:
            await self._socket.send(data, text=True)
            return
        if _APPEND in data[:64]:
            self.carried.client_event("input_audio_buffer.append")
            self._note_idle()
            await self._socket.send(data, text=True)
            return
        event = _parsed(data)
        kind = str(event.get("type")) if event is not None else ""
        self.carried.client_event(kind)
        self._note_idle()
        if (
            event is not None
            and kind == "conversation.item.truncate"
            and event.get("item_id") in self.carried.spoken_as_text
        ):
            await self._truncate_as_text(event)
            return
        await self._socket.send(data, text=True)

    async def close(self) -> None:
        """Close the upstream socket, and any being prepared; idempotent."""
        self._gate.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._fresh is not None:
            await self._fresh.close()
        await self._socket.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    # -- events through ----------------------------------------------------------

    def _note_idle(self) -> None:
        if self.carried.idle:
            self._idle.set()
        else:
            self._idle.clear()

    def _filter(self, event: dict[str, Any], frame: bytes) -> bytes | None:
        """`frame` for the client, what replaces it, or None to drop it."""
        kind = str(event.get("type"))
        if kind == "error":
            error = event.get("error")
            caused_by = error.get("event_id") if isinstance(error, dict) else None
            if not isinstance(caused_by, str):
                return frame
            if caused_by in self._silent:
                self._silent.discard(caused_by)
                if caused_by == self._barrier:
                    self._answer_barrier()
                return None
            if caused_by not in self._on_behalf:
                return frame
            assert isinstance(error, dict)
            error["event_id"] = self._on_behalf.pop(caused_by)
            return orjson.dumps(event)
        item = event.get("item")
        item_id = event.get("item_id") or (item.get("id") if isinstance(item, dict) else None)
        key = (kind, str(item_id))
        if key in self._swallow:
            return self._swallow.pop(key)
        return frame

    async def _truncate_as_text(self, event: dict[str, Any]) -> None:
        """Truncate an assistant item a rollover carried as text.

        The upstream holds it as text, which it cannot truncate: the link
        replaces it (same id, same place) with an empty text, as a truncate
        empties the transcript, and answers `conversation.item.truncated`.
        """
        number = next(self._ids)
        item_id = str(event["item_id"])
        client_event = event.get("event_id")
        delete_id, create_id = f"sb_truncate_{number}_delete", f"sb_truncate_{number}_create"
        on_behalf = client_event if isinstance(client_event, str) else None
        self._on_behalf[delete_id] = self._on_behalf[create_id] = on_behalf
        truncated = {
            "type": "conversation.item.truncated",
            "event_id": f"event_sb_truncated_{number}",
            "item_id": item_id,
            "content_index": event.get("content_index", 0),
            "audio_end_ms": event.get("audio_end_ms", 0),
        }
        self._swallow[("conversation.item.deleted", item_id)] = None
        self._swallow[("conversation.item.added", item_id)] = orjson.dumps(truncated)
        self._swallow[("conversation.item.done", item_id)] = None
        create = {
            "type": "conversation.item.create",
            "event_id": create_id,
            "previous_item_id": self.carried.predecessor(item_id) or "root",
            "item": {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": ""}],
            },
        }
        delete = {"type": "conversation.item.delete", "event_id": delete_id, "item_id": item_id}
        await self._socket.send(orjson.dumps(delete), text=True)
        await self._socket.send(orjson.dumps(create), text=True)

    # -- rollover -----------------------------------------------------------------

    async def _roll(self, limit_s: float, margin_s: float) -> None:
        retry_s = min(MAX_RETRY_S, margin_s / 4)
        opened = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, opened + limit_s - margin_s - time.monotonic()))
            while True:
                if await self._attempt():
                    break
                await asyncio.sleep(retry_s)  # the old session is kept meanwhile
            opened = time.monotonic()

    async def _attempt(self) -> bool:
        """One rollover: True once the new session is the one in use."""
        await self._idle.wait()
        version = self.carried.version
        started = time.monotonic()
        try:
            fresh, spoken = await self._prepare()
        except (
            SwitchboardError,
            UpstreamClosed,
            TimeoutError,
            orjson.JSONDecodeError,
        ) as exc:
            self._counted("failed")
            log.warning(
                "realtime session rollover failed; the current upstream session is kept",
                extra={**self._log_extra, "error": type(exc).__name__},
            )
            return False
        if self.carried.version != version:
            await fresh.close()
            return False
        self._fresh, self._fresh_version, self._fresh_spoken = fresh, version, spoken
        barrier = f"sb_barrier_{next(self._ids)}"
        self._barrier = barrier
        self._silent.add(barrier)
        self._barrier_answered.clear()
        self._gate.clear()
        retrieve = {
            "type": "conversation.item.retrieve",
            "event_id": barrier,
            "item_id": BARRIER_ITEM,
        }
        try:
            await self._socket.send(orjson.dumps(retrieve), text=True)
            async with asyncio.timeout(self._timeout_s):
                await self._barrier_answered.wait()
        except (TimeoutError, UpstreamClosed):
            pass
        finally:
            # A late answer stays silent (the id stays in _silent) but swaps nothing.
            self._barrier = None
            self._gate.set()
        if self._fresh is not None:  # not swapped: the session moved on meanwhile
            stale, self._fresh = self._fresh, None
            await stale.close()
            return False
        self._counted("completed")
        log.info(
            "realtime session rolled over",
            extra={
                **self._log_extra,
                "items": len(self.carried.items),
                "duration_ms": round((time.monotonic() - started) * 1000),
            },
        )
        return True

    def _answer_barrier(self) -> None:
        """The old socket has answered all that went before the barrier: swap if still due."""
        fresh = self._fresh
        if fresh is not None and self.carried.idle and self.carried.version == self._fresh_version:
            old, self._socket, self._fresh = self._socket, fresh, None
            self.carried.spoken_as_text |= self._fresh_spoken
            task = asyncio.create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._barrier = None
        self._gate.set()
        self._barrier_answered.set()

    async def _prepare(self) -> tuple[RealtimeSocket, set[str]]:
        """A new upstream session configured as this one, its conversation replayed."""
        async with asyncio.timeout(self._timeout_s):
            fresh = await self._reopen()
            try:
                created = orjson.loads(await fresh.recv(decode=False))
                if created.get("type") != "session.created":
                    raise UpstreamStreamBroken("The upstream did not open with session.created.")
                number = next(self._ids)
                update_id = f"sb_rollover_{number}_session"
                update = orjson.loads(self.carried.session_update())
                await fresh.send(orjson.dumps({**update, "event_id": update_id}), text=True)
                replays, spoken = self.carried.replay(f"sb_rollover_{number}_item_")
                for replay in replays:
                    await fresh.send(replay, text=True)
                barrier = f"sb_rollover_{number}_barrier"
                retrieve = {
                    "type": "conversation.item.retrieve",
                    "event_id": barrier,
                    "item_id": BARRIER_ITEM,
                }
                await fresh.send(orjson.dumps(retrieve), text=True)
                while True:
                    answer = orjson.loads(await fresh.recv(decode=False))
                    if answer.get("type") != "error":
                        continue
                    error = answer.get("error")
                    if isinstance(error, dict) and error.get("event_id") == barrier:
                        return fresh, spoken
                    raise UpstreamStreamBroken("The new upstream session refused the carry-over.")
            except BaseException:
                await fresh.close()
                raise


def _parsed(data: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None
