"""Every voice session of one gateway over one gRPC call: the broker's side of
`RealtimeService.Sessions` (proto/switchboard/v1/realtime.proto).

A voice session streams about fifty audio chunks a second each way. As one
`Session` call per session, each chunk cost a gRPC message of its own on both
sides, and at a hundred sessions the message writes and reads were the largest
part of the gateway's and the broker's time (docs/voice.md#performance). A
gateway therefore runs all its voice sessions at a broker over one `Sessions`
call (its side is gateway/voice_mux.py), and each message carries the frames
of every session that had something to say since the last one.

A `SessionMux` is one such call. It runs each session exactly as a `Session`
call would run (`RealtimeSessions.Session`, given the session's requests as a
stream and the call's context), in a task of its own: a session's first frame
starts it, `done` ends its requests, `cancel` cancels its task (as gRPC
cancels the handler of a cancelled call), and when the session's handler
returns, an `end` frame tells the gateway. Responses are sent in batches: a
session's response wakes the writer, which lets the event loop turn once more
so that the other sessions' responses of that moment join in. Nothing waits
on a clock.

Backpressure: while the gateway does not read, frames wait here up to
`MAX_BUFFERED_BYTES`; beyond it the sessions' handlers wait (and with them
their upstream reads), as they would on a `Session` call's flow control.

A traced session (its first frame carries a `trace_context`) gets the SERVER
span its `Session` call would have had. When the call ends (the gateway left
or died), every session on it is cancelled. A draining broker says so
(`draining`) and refuses new sessions on the call with `service_unavailable`;
the call ends once its sessions have, and the gateway opens new sessions on a
new call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace

from switchboard.broker.multiplex import failure_of
from switchboard.broker.realtime_held import Outgoing
from switchboard.errors import ServiceUnavailable
from switchboard.interceptors import carried_server_span, end_carried_span
from switchboard.v1 import realtime_pb2

SESSION_METHOD = "/switchboard.v1.RealtimeService/Session"
# Frames held for a gateway that does not read before sessions wait.
MAX_BUFFERED_BYTES = 8 * 1024 * 1024

Handler = Callable[
    [AsyncIterator[realtime_pb2.RealtimeRequest], grpc.aio.ServicerContext],
    AsyncIterator[Outgoing],
]
# A frame of a `RealtimeMuxResponse`, as the keyword arguments of its message: the
# message is built once, for the whole batch, in `responses` (each message built
# apart and then nested would copy an audio delta once per level).
_Frame = dict[str, Any]


class _Session:
    """One session on the call: its requests, and the task that serves it."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[realtime_pb2.RealtimeRequest | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def stream(self) -> AsyncIterator[realtime_pb2.RealtimeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request


class SessionMux:
    """One `Sessions` call (see the module): `handle` its requests, send its `responses`."""

    def __init__(self, handler: Handler, context: grpc.aio.ServicerContext) -> None:
        self._handler = handler
        self._context = context
        self._sessions: dict[int, _Session] = {}
        self._highest = 0  # numbers at or below it have started (maybe ended)
        self._frames: list[_Frame] = []
        self._bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._draining = False
        self._draining_said = False
        self._requests_ended = False

    def handle(self, message: realtime_pb2.RealtimeMuxRequest) -> None:
        """Take one message of the gateway's, in order."""
        for frame in message.frames:
            number, action = frame.session, frame.WhichOneof("action")
            session = self._sessions.get(number)
            if action == "request":
                if session is None:
                    if number <= self._highest:
                        continue  # a session that ended; the gateway learns it from `end`
                    session = self._start(number, frame)
                    if session is None:
                        continue
                session.requests.put_nowait(frame.request)
            elif session is not None and action == "done":
                session.requests.put_nowait(None)
            elif session is not None and action == "cancel":
                self._sessions.pop(number, None)
                if session.task is not None:
                    session.task.cancel()

    def requests_ended(self) -> None:
        """The gateway ended its requests: no new sessions; the call ends after these."""
        self._requests_ended = True
        self._wake.set()

    def drain(self) -> None:
        """The broker drains: say so, refuse new sessions, end once the sessions have."""
        self._draining = True
        self._wake.set()

    def close(self) -> None:
        """The call is over: cancel every session still on it."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            if session.task is not None:
                session.task.cancel()
        self._room.set()

    async def responses(self) -> AsyncIterator[realtime_pb2.RealtimeMuxResponse]:
        """The call's responses, each with the frames of every session that had news."""
        while True:
            if not self._frames and not self._draining_news():
                if self._over():
                    return
                self._wake.clear()
                await self._wake.wait()
                # One more turn of the loop: what other sessions have now joins this message.
                await asyncio.sleep(0)
            frames, self._frames, self._bytes = self._frames, [], 0
            self._room.set()
            draining = self._draining
            self._draining_said = self._draining_said or draining
            # protobuf takes a message's fields as a dict (its stubs do not say so).
            yield realtime_pb2.RealtimeMuxResponse(
                frames=frames,  # type: ignore[arg-type]
                draining=draining,
            )

    def _draining_news(self) -> bool:
        return self._draining and not self._draining_said

    def _over(self) -> bool:
        return (self._draining or self._requests_ended) and not self._sessions

    def _start(self, number: int, frame: realtime_pb2.RealtimeMuxRequestFrame) -> _Session | None:
        self._highest = number
        if self._draining:
            refused = ServiceUnavailable("The broker is draining; open the session again.")
            self._put_now(number, realtime_pb2.RealtimeResponse(failure=failure_of(refused)))
            self._put_now(number, None)
            return None
        session = self._sessions[number] = _Session()
        session.task = asyncio.create_task(
            self._serve(number, session, frame.trace_context, frame.request.open)
        )
        return session

    async def _serve(
        self,
        number: int,
        session: _Session,
        carrier: Mapping[str, str],
        opening: realtime_pb2.RealtimeOpen,
    ) -> None:
        span = carried_server_span(SESSION_METHOD, carrier, opening) if carrier else None
        cancelled = False
        try:
            with trace.use_span(span) if span is not None else contextlib.nullcontext():
                responses = self._handler(session.stream(), self._context)
                async with contextlib.aclosing(responses) as each:  # type: ignore[type-var]
                    async for response in each:
                        if self._bytes >= MAX_BUFFERED_BYTES:
                            await self._room_for_more()
                        self._put_now(number, response)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if self._sessions.get(number) is session:
                del self._sessions[number]
                self._put_now(number, None)
            self._wake.set()  # the call may be over
            if span is not None:
                end_carried_span(span, None, cancelled=cancelled)

    async def _room_for_more(self) -> None:
        while self._bytes >= MAX_BUFFERED_BYTES:
            self._room.clear()
            await self._room.wait()

    def _put_now(self, number: int, response: Outgoing | None) -> None:
        frame: _Frame
        if response is None:
            frame = {"session": number, "end": True}
        elif isinstance(response, list):  # upstream events, kept as bytes until sent
            frame = {"session": number, "response": {"events": {"events": response}}}
            self._bytes += sum(map(len, response))
        else:
            frame = {"session": number, "response": response}
            self._bytes += response.ByteSize()
        self._frames.append(frame)
        self._wake.set()


async def serve(
    handler: Handler,
    requests: AsyncIterator[realtime_pb2.RealtimeMuxRequest],
    context: grpc.aio.ServicerContext,
    muxes: set[SessionMux],
    draining: bool,
) -> AsyncGenerator[realtime_pb2.RealtimeMuxResponse, None]:
    """Serve one `Sessions` call; `muxes` holds it while it runs (for `drain`)."""
    mux = SessionMux(handler, context)
    if draining:
        mux.drain()
    muxes.add(mux)
    # The generator may not be closed for a while after the gateway is gone;
    # its sessions are cancelled at once.
    context.add_done_callback(lambda _context: mux.close())
    reader = asyncio.create_task(_read(requests, mux))
    try:
        async for response in mux.responses():
            yield response
    finally:
        muxes.discard(mux)
        reader.cancel()
        mux.close()


async def _read(requests: AsyncIterator[realtime_pb2.RealtimeMuxRequest], mux: SessionMux) -> None:
    try:
        async for message in requests:
            mux.handle(message)
    except (grpc.RpcError, asyncio.CancelledError):
        pass
    finally:
        mux.requests_ended()
