"""One-way streaming over Server-Sent Events: the transport of `POST
/v1/chat/completions` and `POST /v1/responses` (openai_http.py), driving the
same `TurnRunner` as the Realtime WebSocket.

A request becomes a session of its own (its messages stored as items) and one
turn. `StreamPump` runs the turn: the protocol core's Realtime events are
recorded in the session's event log in batches, exactly as the WebSocket path
records them, and only then translated (chat_completions.py, responses_api.py)
into the frames the client gets. Every frame's SSE `id` is
`<session_id>.<seq>.<n>`: the seq of the logged event it was made from and its
place among that event's frames. A client that reconnects with
`Last-Event-ID` (`resume_stream`) gets the frames after it, rebuilt from the
log: on any replica, while the turn runs (following the log) and for as long
as the session lives after it.

`EventStreamResponse` is the HTTP side. Until the first delta the client is
sent nothing, so a turn refused before it (rate limit, budget, shedding, a
failed upstream) is answered with the error's HTTP status and OpenAI's error
JSON; from the first delta on, frames flow as they are recorded, and a later
failure is an `error` frame. A client that disconnects cancels the turn at once
(its model call is cancelled at the broker), unless the request asked for a
resumable stream (`Switchboard-Resumable: true`): then the turn runs on,
recorded, for the disconnect grace, for the client to resume. A client that
falls more than `max_buffered_bytes` behind is cut the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from switchboard.errors import SessionTakenOver, SwitchboardError, invalid_value
from switchboard.gateway.commands import StartResponse
from switchboard.gateway.eventlog import SessionWriter
from switchboard.gateway.ids import event_seq
from switchboard.gateway.leases import Lease, Outcome
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.resources import Resources
from switchboard.gateway.resume import reopen_response, replay
from switchboard.gateway.stream_format import END_MARKER, OPEN_MARKER, Frame, StreamEnd, TurnRequest
from switchboard.gateway.turns import BEFORE_OUTPUT_S, Turn, TurnRunner
from switchboard.tenancy import Tenant
from switchboard.v1 import session_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]

RESUMABLE_HEADER = "switchboard-resumable"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tell nginx-style proxies not to buffer the stream.
    (b"x-accel-buffering", b"no"),
]


class Translator(Protocol):
    """A turn's logged events into an API's frames (chat_completions.py, responses_api.py)."""

    end: StreamEnd

    def feed(self, event: Event) -> list[Frame]: ...


def frame_id(session_id: str, seq: int, index: int) -> str:
    return f"{session_id}.{seq}.{index}"


def parse_frame_id(value: str) -> tuple[str, int, int]:
    """The session, seq and index an SSE `id` of ours names.

    Raises:
        InvalidRequest: `invalid_value` (param `Last-Event-ID`) for anything else.
    """
    session_id, _, rest = value.partition(".")
    seq, _, index = rest.partition(".")
    if not session_id.startswith("sess_") or not seq.isdigit() or not index.isdigit():
        raise invalid_value("Last-Event-ID", "'Last-Event-ID' is not an event id of a stream.")
    return session_id, int(seq), int(index)


def encode(frame_id_: str, frame: Frame) -> bytes:
    """One SSE event: `id`, the optional `event` name, and its one-line `data`."""
    data = frame.data if isinstance(frame.data, str) else orjson.dumps(frame.data).decode()
    head = f"id: {frame_id_}\n"
    if frame.event is not None:
        head += f"event: {frame.event}\n"
    return f"{head}data: {data}\n\n".encode()


class FrameSink:
    """Frames for the client, in order, as translated from logged events.

    The producer (`feed`) never waits on the client; when what waits passes
    `max_bytes`, `overflow` is set and the client is cut (it resumes from the log).
    """

    def __init__(
        self, session_id: str, translator: Translator, after: tuple[int, int], max_bytes: int
    ) -> None:
        self.session_id = session_id
        self.translator = translator
        # Frames up to this (seq, index) were sent before (a resume): skip them.
        self.after = after
        self.max_bytes = max_bytes
        self.frames: deque[tuple[bytes, Frame]] = deque()
        self.size = 0
        self.finished = False
        self.changed = asyncio.Event()
        self.overflow = asyncio.Event()

    def feed(self, event: Event, seq: int) -> None:
        for index, frame in enumerate(self.translator.feed(event)):
            if (seq, index) <= self.after:
                continue
            data = encode(frame_id(self.session_id, seq, index), frame)
            self.frames.append((data, frame))
            self.size += len(data)
        if event.get("type") == END_MARKER:
            self.finished = True
        if self.size > self.max_bytes:
            self.overflow.set()
        self.changed.set()

    def finish(self) -> None:
        self.finished = True
        self.changed.set()

    def take(self) -> list[tuple[bytes, Frame]]:
        taken = list(self.frames)
        self.frames.clear()
        self.size = 0
        self.changed.clear()
        return taken


class StreamPump:
    """Runs one SSE stream: a new request's turn, or the resume of a stream.

    Lifecycle: `start()` opens the protocol, logs the stream's first event and
    starts the turn; `resume()` replays the stream's log into the sink,
    following it while another connection (here or on another gateway) still
    writes it, and, when that writer died mid-turn, takes the turn up (the
    model call re-attached at its broker). Either way `task` ends after the
    turn has ended, its last event is recorded and everything the stream held
    (the session's writer lease, the tenant's connection slot) is released.
    `client_left()` and the drain (`drain`, `stop_now`) are how the outside
    stops it.
    """

    def __init__(
        self,
        gateway: Resources,
        tenant: Tenant,
        session: session_pb2.Session,
        sink: FrameSink,
        *,
        api: str,
        holder: str,
        resumable: bool,
    ) -> None:
        self.gateway = gateway
        self.tenant = tenant
        self.session = session
        self.sink = sink
        self.api = api
        self.holder = holder
        self.resumable = resumable
        self.writer = SessionWriter(
            gateway.backends,
            gateway.recorder,
            tenant.id,
            session.id,
            holder,
            gateway.settings.session_lease_s,
        )
        self.protocol: RealtimeProtocol | None = None
        self.turn: Turn | None = None
        self.task: asyncio.Task[None] | None = None
        # Why the stream ended early, for the disconnects metric (None: it did not).
        self.end_reason: str | None = None
        self._pending: list[Event] = []
        self._wake = asyncio.Event()
        # While set, the writer leaves what waits (`start`).
        self._held: asyncio.TimerHandle | None = None
        self._taken = False
        self._lease: Lease | None = None
        self._unrecorded_warned = False
        self._log = {"tenant_id": tenant.id, "session_id": session.id, "api": api}

    def _open(self, first_event_seq: int) -> tuple[RealtimeProtocol, TurnRunner]:
        settings = self.gateway.settings
        protocol = self.protocol = RealtimeProtocol(
            session_id=self.session.id,
            config=self.session.config,
            max_event_bytes=settings.max_event_bytes,
            first_event_seq=first_event_seq,
        )
        protocol.open(resumed=True)  # no session.created: the client never sees it
        runner = TurnRunner(
            protocol,
            self.gateway.backends,
            self.gateway.gate,
            self.gateway.metrics,
            self.tenant,
            self.writer,
            publish=self.publish,
            on_refused=lambda error: None,  # the stream ends with its turn anyway
            on_taken_over=self._taken_over,
            max_tool_rounds=settings.max_tool_rounds,
            catalogues=self.gateway.catalogues,
            on_output=self._unhold,
        )
        return protocol, runner

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, request: TurnRequest, context: session_pb2.Context | None = None) -> None:
        """Log the stream's first event and run the request's turn.

        Args:
            context: read with the request's last item (`TurnRunner.start`).
        """
        protocol, runner = self._open(1)
        self._pending.append(
            {
                "type": OPEN_MARKER,
                "event_id": protocol.ids.new("event"),
                "api": self.api,
                "stream_id": self.session.id.removeprefix("sess_"),
                "created": int(time.time()),
                "model": request.model,
                "include_usage": request.include_usage,
                "client_tools": [tool.name for tool in self.session.config.tools],
                "echo": request.echo,
            }
        )
        commands = protocol.receive_text('{"type":"response.create"}')
        command = commands[0]
        assert isinstance(command, StartResponse), "the protocol refused its own response.create"
        # The first events wait for the response's first output, to be recorded
        # with it rather than while the model call starts (turns.BEFORE_OUTPUT_S).
        loop = asyncio.get_running_loop()
        self._held = loop.call_later(BEFORE_OUTPUT_S, self._unhold)
        self.publish()
        self.turn = runner.start(command, context=context)
        self.task = asyncio.create_task(self._run())

    def resume(self) -> None:
        """Replay the stream from its log (the sink skips what the client saw),
        then finish it here if its writer died before it ended."""
        self.task = asyncio.create_task(self._resume())

    async def _resume(self) -> None:
        try:
            await replay(self.writer, 0, self._replayed)
            if not self.sink.finished:
                # This connection holds the session now, and the stream has not
                # ended: its writer died. Take the turn up where the log ends.
                await self._take_over()
        except (SwitchboardError, asyncio.CancelledError) as exc:
            # The log could not be read, or the client left while following it.
            code = exc.name if isinstance(exc, SwitchboardError) else "client_left"
            log.info("stream resume ended", extra={**self._log, "code": code})
            self.sink.finish()
            await self._release()
            return
        await self._run()

    async def _take_over(self) -> None:
        backends = self.gateway.backends
        session = await backends.get_session(self.tenant.id, self.session.id)
        protocol, runner = self._open(session.last_event_seq + 1)
        reattach = None
        if session.open_response_id:
            reattach = await reopen_response(backends, protocol, session)
        self.publish()
        log.info("stream taken over", extra={**self._log, "reattach": reattach is not None})
        if reattach is not None:
            self.turn = runner.start(reattach.command, reattach)

    async def _replayed(self, text: str) -> None:
        event = orjson.loads(text)
        self.sink.feed(event, event_seq(event["event_id"]) or 0)

    async def _run(self) -> None:
        """Until the turn has ended (if one runs), record its last events, release."""
        writer = asyncio.create_task(self._write_loop())
        lease = self._lease = self.gateway.leases.hold(self.writer, self._lease_renewed)
        keeper = asyncio.create_task(
            self.gateway.gate.hold_connection(self.tenant, self.holder, self._log)
        )
        try:
            if self.turn is not None:
                await self.turn.wait()
            self._unhold()
            if not self._taken and self.protocol is not None:
                self._pending.append(
                    {"type": END_MARKER, "event_id": self.protocol.ids.new("event")}
                )
            self._pending.append({})  # the writer's stop
            self._wake.set()
            await asyncio.wait_for(writer, self.gateway.settings.session_lease_s)
        except TimeoutError:
            log.warning("stream events not all recorded", extra=self._log)
        finally:
            writer.cancel()
            keeper.cancel()
            self.sink.finish()
            # No renewal in flight may take the lease again after the release.
            await lease.drop()
            await self._release()

    async def _release(self) -> None:
        with contextlib.suppress(SwitchboardError):
            await self.writer.release()
        try:
            await self.gateway.gate.close_connection(self.tenant, self.holder)
        except SwitchboardError as exc:
            log.warning("connection slot not released", extra={**self._log, "code": exc.name})

    def client_left(self, reason: str = "client_closed") -> None:
        """The client disconnected (or was cut): cancel the turn now, or after the
        disconnect grace when the stream is resumable. A resume that only follows
        another connection's stream stops following."""
        if self.end_reason is not None or self.sink.finished:
            return
        self.end_reason = reason
        log.info("client left during a stream", extra={**self._log, "reason": reason})
        turn = self.turn
        if turn is None:
            if self.task is not None:
                self.task.cancel()
            return
        if not self.resumable:
            turn.cancel("client_disconnected")
            return
        grace = self.gateway.settings.disconnect_grace_s
        asyncio.get_running_loop().call_later(grace, turn.cancel, "client_disconnected")

    def drain(self) -> None:
        """The gateway drains: the running turn finishes, then the stream ends."""

    def stop_now(self) -> None:
        """The drain deadline passed: end the turn (`cancelled`, reason `drain`), or
        stop following another gateway's stream (the client resumes elsewhere)."""
        if self.turn is not None:
            if self.turn.cancel("drain"):
                self.end_reason = self.end_reason or "drain"
        elif self.task is not None and not self.task.done():
            self.end_reason = self.end_reason or "drain"
            self.task.cancel()

    def _taken_over(self) -> None:
        """Another gateway took the session (this one's lease lapsed): stop."""
        self._taken = True
        self.end_reason = self.end_reason or "taken_over"
        if self.turn is not None:
            self.turn.abandon()

    # --- recording, then translating ------------------------------------------------------

    def publish(self) -> None:
        assert self.protocol is not None
        for event in self.protocol.take_events():
            if event["type"] == "error":
                self.gateway.metrics.errors.labels(event["error"]["code"]).inc()
            self._pending.append(event)
        if self._held is None:
            self._wake.set()

    def _unhold(self) -> None:
        """The events held since `start` go to the writer."""
        held, self._held = self._held, None
        if held is not None:
            held.cancel()
            self._wake.set()

    async def _write_loop(self) -> None:
        """Record each batch of events in the session's log, then translate it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            stop = bool(batch) and not batch[-1]
            events = [event for event in batch if event]
            if events and not self._taken:
                await self._record(events)
            for event in events:
                self.sink.feed(event, event_seq(event["event_id"]) or 0)
            if stop:
                return

    async def _record(self, events: list[Event]) -> None:
        try:
            await self.writer.record([(event, orjson.dumps(event)) for event in events])
        except SessionTakenOver:
            self._taken_over()
        except SwitchboardError as exc:
            # Serving goes on; only a resume across these events could miss them.
            if not self._unrecorded_warned:
                log.warning("events not recorded", extra={**self._log, "code": exc.name})
                self._unrecorded_warned = True

    def _lease_renewed(self, outcome: Outcome) -> None:
        """A renewal of the session's writer lease (leases.py) answered. A stream
        does not hand its session over: it ends with its turn."""
        if isinstance(outcome, SessionTakenOver):
            if self._lease is not None:
                self._lease.stop()
            self._taken_over()
        elif isinstance(outcome, SwitchboardError):
            log.info("stream lease not renewed", extra={**self._log, "code": outcome.name})


ErrorAnswer = Callable[[SwitchboardError | Event], Response]


class EventStreamResponse:
    """The HTTP side of a stream: an ASGI response (see the module docstring).

    Args:
        pump: the running stream.
        fold: for a non-streaming request, the JSON body from all the frames
            (None: stream the frames as SSE).
        error_response: the HTTP answer (a Starlette response) for an error
            before the first delta: a `SwitchboardError`, or the error object
            the turn's log holds.
    """

    def __init__(
        self,
        pump: StreamPump,
        *,
        fold: Callable[[list[Frame]], Event] | None,
        error_response: ErrorAnswer,
    ) -> None:
        self.pump = pump
        self.fold = fold
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump, sink = self.pump, self.pump.sink
        gone = asyncio.create_task(_disconnected(receive))
        metrics = pump.gateway.metrics
        metrics.sse_streams_active.inc()
        try:
            # Nothing is sent before the first delta: an early refusal gets its status.
            while not (sink.translator.end.committed or sink.finished):
                await _first(sink.changed.wait(), gone)
                if gone.done():
                    pump.client_left()
                    return
                sink.changed.clear()
            sink.changed.set()
            end = sink.translator.end
            if not end.committed and end.error is not None:
                await self._refuse(scope, receive, send)
            elif self.fold is not None:
                await self._send_whole(scope, receive, send, gone)
            else:
                await self._send_stream(send, gone)
        finally:
            metrics.sse_streams_active.dec()
            gone.cancel()
            if pump.end_reason is not None:
                metrics.disconnects.labels(pump.end_reason).inc()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn, end = self.pump.turn, self.pump.sink.translator.end
        failure = turn.failure if turn is not None else None
        assert end.error is not None
        response = self.error_response(failure or end.error)
        self._count(response.status_code)
        await response(scope, receive, send)

    def _count(self, status: int) -> None:
        self.pump.gateway.metrics.sse_requests.labels(self.pump.api, str(status)).inc()

    async def _send_whole(
        self, scope: Scope, receive: Receive, send: Send, gone: asyncio.Task[None]
    ) -> None:
        pump, sink = self.pump, self.pump.sink
        frames: list[Frame] = []
        while True:
            frames.extend(frame for _, frame in sink.take())
            if sink.finished:
                break
            await _first(sink.changed.wait(), gone)
            if gone.done():
                pump.client_left()
                return
        if sink.translator.end.error is not None:
            await self._refuse(scope, receive, send)
            return
        assert self.fold is not None
        body = orjson.dumps(self.fold(frames))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        self._count(200)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_stream(self, send: Send, gone: asyncio.Task[None]) -> None:
        pump, sink = self.pump, self.pump.sink
        overflow = asyncio.create_task(sink.overflow.wait())
        try:
            self._count(200)
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            while True:
                finished = sink.finished
                data = b"".join(data for data, _ in sink.take())
                if data:
                    message = {"type": "http.response.body", "body": data, "more_body": True}
                    await _first(send(message), gone, overflow)
                if overflow.done():
                    # Too far behind: cut (the client resumes from the log).
                    pump.client_left("slow_consumer")
                    return
                if gone.done():
                    pump.client_left()
                    return
                if finished and not sink.frames:
                    break
                await _first(sink.changed.wait(), gone, overflow)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pump.client_left()
        finally:
            overflow.cancel()


async def _first(work: Any, *others: asyncio.Task[Any]) -> None:
    """Wait for `work` (an awaitable) or any of `others`, whichever ends first;
    `work` is cancelled if it has not ended."""
    task = asyncio.ensure_future(work)
    await asyncio.wait((task, *others), return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has disconnected (the request body is read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def new_holder() -> str:
    return "sse_" + secrets.token_urlsafe(12)
