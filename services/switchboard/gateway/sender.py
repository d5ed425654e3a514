"""The sending half of a client connection: outbox -> socket, and the event log.

Events go into a bounded `Outbox` (`put`), which never waits on the client. One
writer task takes what waits in batches and sends them, and records them in the
session's event log (eventlog.py). By default it records each batch before it
sends it. With a `checkpoint_s` (`SWITCHBOARD_GATEWAY_CHECKPOINT_S`), the text
and function-call arguments deltas of the output opened last
(`responses.FAST_DELTAS`) go out at once and are recorded at the next
checkpoint: at most `checkpoint_s` later, before any other event is sent (every
other event is recorded before it is sent, with all that waits unrecorded
before it), and before the connection closes. So a client is never ahead of
the log but by deltas of one output, whose last id says by how much (ids.py),
and a resume serves that tail from the model call's transcript at the broker
(resume.py) if this gateway dies before recording it. A client that reads
slowly gets merged deltas; one that falls more than the outbox's bound behind
is cut: it gets close 4008 `slow_consumer` once it reads its backlog, and the
sender goes on *detached*, recording without sending, like a sender whose
client left (it records at once: its events are for a resume to replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

from starlette.websockets import WebSocketDisconnect

from switchboard import errors
from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.eventlog import SessionWriter
from switchboard.gateway.outbox import Close, Outbox, SlowConsumer
from switchboard.gateway.responses import FAST_DELTAS, UNSENT, opened_output
from switchboard.gateway.transport import SEND_FRAMES
from switchboard.v1 import common_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]

# The close code of a client that fell too far behind (docs/errors.md: slow_consumer).
SLOW_CONSUMER_CLOSE = errors.spec(common_pb2.ERROR_CODE_SLOW_CONSUMER).close_code or 4008

TAKEN_OVER = errors.SessionTakenOver("Another connection resumed this session.")
# A close with this code is preceded by the `session_taken_over` error, unrecorded.
TAKEN_OVER_CLOSE = TAKEN_OVER.spec.close_code or 4509

# How long a cut slow consumer has to read its backlog and get its close frame.
_CLOSE_FRAME_WAIT_S = 10.0

# What a detached sender may hold while it records: far above what Redis needs
# to keep up, but a bound all the same.
_DETACHED_MAX_BYTES = 64 * 1024 * 1024


class ClientSocket(Protocol):
    """What the gateway uses of a client's WebSocket (Starlette's `WebSocket`;
    `switchboard.gateway.testing.MemorySocket` in tests). A socket whose ASGI
    scope offers `transport.SEND_FRAMES` is sent events through it."""

    async def receive(self) -> MutableMapping[str, Any]: ...
    async def send_text(self, data: str) -> None: ...
    async def send_json(self, data: Any, mode: str = "text") -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class Sender:
    """Records and sends one connection's events, in order.

    Args:
        on_cut: called once when the client is cut as a slow consumer.
        on_taken_over: called when an append finds the session is another
            connection's (the events are then dropped).
        checkpoint_s: how long deltas sent at once may wait to be recorded; 0:
            every event is recorded before it is sent.
    """

    def __init__(
        self,
        websocket: ClientSocket,
        log_writer: SessionWriter,
        *,
        max_bytes: int,
        on_cut: Callable[[], None],
        on_taken_over: Callable[[], None],
        checkpoint_s: float = 0.0,
    ) -> None:
        self.websocket = websocket
        self.send_frames = frame_sender(websocket)
        self.log_writer = log_writer
        self.outbox = Outbox(max_bytes=max_bytes)
        # False once the client is gone (or cut): events are recorded, not sent.
        self.attached = True
        self.on_cut = on_cut
        self.on_taken_over = on_taken_over
        self._task: asyncio.Task[None] | None = None
        # True while the writer waits on the client's socket (it may be cut then).
        self._sending = False
        self._closer: asyncio.Task[None] | None = None
        self._unrecorded_warned = False
        self.checkpoint_s = checkpoint_s
        # Deltas sent and not yet recorded, and when the first of them was taken.
        self._unrecorded: list[tuple[Event, bytes]] = []
        self._unrecorded_since = 0.0
        # The item of the output opened last: only its deltas go out unrecorded.
        self._open_output: str | None = None
        self._log = {"tenant_id": log_writer.tenant_id, "session_id": log_writer.session_id}

    @property
    def task(self) -> asyncio.Task[None]:
        """The writer task (started by `start`); it ends when the outbox does."""
        assert self._task is not None
        return self._task

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop())

    def put(self, event: Event) -> None:
        """Queue an event; cut the client if it is now too far behind."""
        try:
            self.outbox.put(event)
        except SlowConsumer as exc:
            self._cut(exc)

    def close(self, code: int, reason: str) -> None:
        """Send what waits, then close the socket with `code` (when attached)."""
        self.outbox.close(code, reason)

    def taken_over(self) -> None:
        """The session is another connection's: drop what waits, tell an attached
        client `session_taken_over` and close (4509)."""
        self.outbox.abort()

    def detach(self) -> None:
        """The client is gone: go on recording, without sending."""
        self.attached = False
        if self.task.done() and not self.outbox.ended:
            # The writer was stopped mid-send to a cut client: record the rest.
            self.start()

    async def finish(self, timeout_s: float) -> None:
        """After `detach`: record what waits (for up to `timeout_s`), then stop. A
        cut client gets its close frame if it reads its backlog meanwhile."""
        # Ends the detached writer once it has recorded what waits; the code is
        # never sent.
        self.outbox.close(1012, "closed")
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(self.task, timeout=timeout_s)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._closer, timeout=_CLOSE_FRAME_WAIT_S)

    def _cut(self, exc: SlowConsumer) -> None:
        """Cut a client that fell too far behind (4008): it resumes from the log,
        where what it missed (and the rest of the running response) is recorded."""
        log.warning(
            "slow consumer",
            extra={**self._log, "detail": str(exc), "waiting_events": len(self.outbox)},
        )
        self.attached = False
        self.outbox.max_bytes = _DETACHED_MAX_BYTES
        if self._sending and self._task is not None:
            # Stuck on the client's full socket: what it was sending is recorded.
            self._task.cancel()
        # The close frame itself may wait until the client reads again (or the
        # heartbeat gives up on it).
        self._closer = asyncio.create_task(self._close_socket(SLOW_CONSUMER_CLOSE, "slow_consumer"))
        self.on_cut()

    async def _close_socket(self, code: int, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.websocket.close(code=code, reason=reason)

    async def _write_loop(self) -> None:
        """Send each batch of events; record it first unless it is all deltas sent
        at once, which are recorded at the next checkpoint."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._unrecorded_since + self.checkpoint_s if self._unrecorded else None
            batch = await self.outbox.get_batch(deadline=deadline)
            if batch is None:  # aborted: taken over
                if self.attached:
                    await close_with_error(self.websocket, TAKEN_OVER)
                return
            if isinstance(batch, Close):
                await self._record([])
                if self.attached and batch.code == TAKEN_OVER_CLOSE:
                    await close_with_error(self.websocket, TAKEN_OVER)
                elif self.attached:
                    await self._close_socket(batch.code, batch.reason)
                return
            if not batch:  # the checkpoint's deadline passed
                await self._record([])
                continue
            if self.checkpoint_s > 0 and self._sent_at_once(batch) and self.attached:
                if not self._unrecorded:
                    self._unrecorded_since = loop.time()
                self._unrecorded += batch
            elif not await self._record(batch):
                continue
            if not self.attached:
                continue
            self._sending = True
            try:
                frames = [data for event, data in batch if UNSENT not in event]
                if frames:
                    await self.send_frames(frames)
            except (WebSocketDisconnect, RuntimeError, OSError):
                # The client is gone; the reader sees the disconnect. Keep recording.
                self.attached = False
            finally:
                self._sending = False
            if self._unrecorded and loop.time() - self._unrecorded_since >= self.checkpoint_s:
                await self._record([])

    def _sent_at_once(self, batch: list[tuple[Event, bytes]]) -> bool:
        """Whether the batch is all deltas of the output opened last (noting the
        outputs it opens)."""
        at_once = True
        for event, _ in batch:
            if event["type"] in FAST_DELTAS and UNSENT not in event:
                if event["item_id"] != self._open_output:
                    at_once = False
                continue
            at_once = False
            opened = opened_output(event)
            if opened is not None:
                self._open_output = opened
        return at_once

    async def _record(self, batch: list[tuple[Event, bytes]]) -> bool:
        """Record what waits unrecorded, then `batch`; False when the session is
        another connection's (the events are then dropped)."""
        events, self._unrecorded = self._unrecorded + batch, []
        if not events:
            return True
        try:
            await self.log_writer.record(events)
        except SessionTakenOver:
            self.on_taken_over()
            return False
        except SwitchboardError as exc:
            # Serving goes on; only a resume across these events could miss them.
            if not self._unrecorded_warned:
                log.warning("events not recorded", extra={**self._log, "code": exc.name})
                self._unrecorded_warned = True
        return True


def frame_sender(websocket: ClientSocket) -> Callable[[Sequence[bytes]], Awaitable[None]]:
    """How to send a batch of encoded events to `websocket`: the transport's
    `send_frames` when its ASGI scope offers it (transport.py), else one
    `send_text` each."""
    scope = getattr(websocket, "scope", None)
    direct = scope.get("extensions", {}).get(SEND_FRAMES) if isinstance(scope, dict) else None
    if direct is not None:
        return direct  # type: ignore[no-any-return]

    async def one_by_one(texts: Sequence[bytes]) -> None:
        for text in texts:
            await websocket.send_text(text.decode())

    return one_by_one


async def close_with_error(websocket: ClientSocket, error: SwitchboardError) -> None:
    """End an accepted connection: the `error` event, then the error's close code.
    (Not through the outbox: the event is not part of the session's log.)"""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(
            {"type": "error", "event_id": "", "error": error.to_event_error(None)}
        )
        await websocket.close(code=error.spec.close_code or 1011, reason=error.name)
