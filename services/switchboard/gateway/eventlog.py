"""A session's event log as the gateway writes it (the resume extension; replaying
it is resume.py's).

Every server event a connection sends is first recorded in the session's log
(session service, Redis) in batches: the connection's writer takes what waits
in its outbox, appends it in one call, then sends it. So whatever a client has
seen is in the log, and a client that reconnects with the id of the last event
it saw gets exactly the events after it (docs/protocol.md, Resume).

The appends of all the gateway's connections go through one `EventRecorder`:
while a call is out, the appends that arrive gather and leave together in the
next `AppendEventsBatch`, so many slow streams cost a few calls, not one per
token each, and an idle gateway adds no wait.

One connection at a time writes a session's log: it holds the session's writer
lease, renewed by every append and by the gateway's `LeaseRenewals` (leases.py:
all its connections' leases in one call a tick; a connection skips it while its
turn's appends keep the lease). A connection that
resumes a session elsewhere asks for the lease; the holder hands it over when
its running response ends (it keeps recording that response for the resumer,
which follows the log meanwhile), or at once when idle. An append by a holder
that lost the lease is refused (`session_taken_over`), so two gateways never
interleave events in one log.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.ids import event_seq, made_event_seq
from switchboard.gateway.responses import UNSENT
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]


class _Batch:
    """An `AppendEventsBatch` request being filled, and the appenders waiting on it."""

    __slots__ = ("futures", "request", "size")

    def __init__(self) -> None:
        self.request = session_pb2.AppendEventsBatchRequest()
        self.futures: list[asyncio.Future[None]] = []
        self.size = 0


class EventRecorder:
    """The gateway's appends to session event logs, sent in shared batches.

    An append is written in place into the batch that goes next (`append_with`),
    not built apart and copied into it.
    """

    def __init__(
        self,
        backends: Backends,
        *,
        max_in_flight: int = 4,
        max_batch: int = 512,
        max_batch_bytes: int = 16 * 1024 * 1024,
    ):
        self.backends = backends
        self.max_batch = max_batch
        # Well under the gRPC message limit (rpc.MAX_MESSAGE_BYTES); one append
        # larger than this still goes, alone.
        self.max_batch_bytes = max_batch_bytes
        self._slots = asyncio.Semaphore(max_in_flight)
        # Full batches waiting for a slot, oldest first; then the one being filled.
        self._full: deque[_Batch] = deque()
        self._filling: _Batch | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def append(self, request: session_pb2.AppendEventsRequest) -> None:
        """Append `request` (copied), in the next batch; raises what this append
        got (see AppendEventsBatch)."""

        def fill(into: session_pb2.AppendEventsRequest) -> int:
            into.CopyFrom(request)
            return sum(len(event.payload) for event in request.events)

        await self.append_with(fill)

    async def append_with(self, fill: Callable[[session_pb2.AppendEventsRequest], int]) -> None:
        """Append the request `fill` writes into the empty one it is given (and
        returns the bytes of its payloads), in the next batch; raises what this
        append got (see AppendEventsBatch)."""
        batch = self._filling
        if batch is None:
            batch = self._filling = _Batch()
        appends = batch.request.appends
        request = appends.add()
        try:
            size = fill(request)
        except BaseException:
            del appends[-1]
            raise
        if batch.futures and batch.size + size > self.max_batch_bytes:
            # Over the batch's bytes: this append opens the next batch.
            moved = session_pb2.AppendEventsRequest()
            moved.CopyFrom(request)
            del appends[-1]
            self._full.append(batch)
            batch = self._filling = _Batch()
            batch.request.appends.append(moved)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.futures.append(future)
        batch.size += size
        if len(batch.futures) >= self.max_batch:
            self._full.append(batch)
            self._filling = None
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await future

    async def close(self) -> None:
        for task in (self._task, *self._calls):
            if task is not None:
                task.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._full or (self._filling is not None and self._filling.futures):
                await self._slots.acquire()
                batch = self._take_batch()
                if batch is None:
                    self._slots.release()
                    break
                call = asyncio.create_task(self._send(batch))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)

    def _take_batch(self) -> _Batch | None:
        """The oldest batch: a full one, else the one being filled (None: none waits)."""
        if self._full:
            return self._full.popleft()
        batch = self._filling
        if batch is None or not batch.futures:
            return None
        self._filling = None
        return batch

    async def _send(self, batch: _Batch) -> None:
        try:
            reply = await self.backends.append_events_batch(batch.request)
        except SwitchboardError as error:
            for future in batch.futures:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._slots.release()
        for future, result in zip(batch.futures, reply.results, strict=True):
            if future.done():
                continue
            if result.error_code:
                future.set_exception(
                    batch_error(result.error_code, result.error_message, result.error_param)
                )
            else:
                future.set_result(None)


def batch_error(code: int, message: str, param: str) -> SwitchboardError:
    """The error one part of a batch call (an append, a claim) answered."""
    if code == common_pb2.ERROR_CODE_SESSION_TAKEN_OVER:
        return SessionTakenOver(message)
    return SwitchboardError(message, code=code, param=param or None)


class SessionWriter:
    """The writer side of one connection's session log."""

    def __init__(
        self,
        backends: Backends,
        recorder: EventRecorder,
        tenant_id: str,
        session_id: str,
        holder: str,
        lease_s: float,
    ) -> None:
        self.backends = backends
        self.recorder = recorder
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.holder = holder
        self.lease_ms = int(lease_s * 1000)
        self._appended_at = -1e9  # monotonic time of the last append that succeeded
        # A note of the broker running a response, for the next `record` to carry.
        self._broker_note: tuple[str, str] | None = None

    async def record(self, batch: list[tuple[Event, bytes]]) -> None:
        """Append a batch of sent-to-be events (each with its JSON), in order, and
        mark the response in progress after them.

        Raises:
            SessionTakenOver: another connection holds the session now.
            SwitchboardError: the session service or Redis failed.
        """

        def fill(request: session_pb2.AppendEventsRequest) -> int:
            request.tenant_id = self.tenant_id
            request.session_id = self.session_id
            request.holder = self.holder
            request.lease_ms = self.lease_ms
            open_response: str | None = None
            size = 0
            add = request.events.add
            for event, payload in batch:
                event_id = event["event_id"]
                # An unsent event is recorded under a client's last event id (a gap).
                seq = (event_seq(event_id) or 0) if UNSENT in event else made_event_seq(event_id)
                add(seq=seq, event_id=event_id, payload=payload)
                size += len(payload)
                kind = event["type"]
                if kind == "response.created":
                    open_response = event["response"]["id"]
                    request.open_response_seq = seq
                elif kind == "response.done":
                    open_response = ""
                    request.open_response_seq = 0
            if open_response is not None:
                request.open_response_id = open_response
            if note is not None:
                request.broker_response_id, request.broker_address = note
            return size

        note, self._broker_note = self._broker_note, None
        try:
            await self.recorder.append_with(fill)
        except BaseException:
            if note is not None and self._broker_note is None:
                self._broker_note = note  # for the next append, or alone
            raise
        self._appended_at = time.monotonic()

    def appended_within(self, seconds: float) -> bool:
        """Whether an append succeeded in the last `seconds` (it renewed the lease)."""
        return time.monotonic() - self._appended_at < seconds

    async def note_broker(self, response_id: str, broker: str, *, wait_s: float = 0.0) -> None:
        """Note the broker running `response_id`, where a connection that resumes
        this session after this gateway died re-attaches to the model call.

        Args:
            wait_s: how long the note may wait for a `record` to carry it (one
                append for both) before it is appended alone.

        Raises:
            SessionTakenOver, SwitchboardError: as `record` (appended alone).
        """
        if wait_s > 0:
            note = self._broker_note = (response_id, broker)
            await asyncio.sleep(wait_s)
            if self._broker_note is not note:
                return  # a `record` carried it (or a newer note replaced it)
            self._broker_note = None
        await self.recorder.append(
            session_pb2.AppendEventsRequest(
                tenant_id=self.tenant_id,
                session_id=self.session_id,
                holder=self.holder,
                lease_ms=self.lease_ms,
                broker_response_id=response_id,
                broker_address=broker,
            )
        )

    async def release(self) -> None:
        """Free the session's writer lease if this connection holds it, in the
        recorder's next batch (no call of its own).

        Raises:
            SwitchboardError: the session service or Redis failed.
        """
        await self.recorder.append(
            session_pb2.AppendEventsRequest(
                tenant_id=self.tenant_id,
                session_id=self.session_id,
                holder=self.holder,
                release_lease=True,
            )
        )
