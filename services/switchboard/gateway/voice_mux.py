"""The gateway's voice sessions at one broker, over one gRPC call.

Every voice session this gateway relays to a broker runs over one
`RealtimeService.Sessions` call (proto/switchboard/v1/realtime.proto; the
broker's side is broker/realtime_mux.py), so that an audio chunk costs a share
of a gRPC message rather than one of its own. `VoiceMux.Session` stands in
for the `Session` call of a `RealtimeServiceStub`: it gives a `MuxedSession`
to `write` the session's requests to (or takes them as a stream), to iterate
for its responses and to `cancel`, which is all voice_connection.py uses of a
call.

The mux numbers the sessions and sends their requests in order; a writer task
sends everything queued since its last write in one message, so under load
many sessions' chunks share a message, and a lone session waits on no clock.
A frame waits as the keyword arguments of its message (client events as bytes),
and the message is built once per write: a message built per frame and then
nested would copy an audio chunk once per level.
The call opens with the first session and again after it broke. When it
breaks (the broker died, the network), each session on it fails as its
`Session` call would have, with a `grpc.RpcError`; when the broker drains,
new sessions go on a new call while the old one ends after its sessions.
In a traced session the `voice session` span is the parent of the CLIENT span
its `Session` call would have had, its trace context carried in the first frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.trace import Span

from switchboard.errors import ServiceUnavailable
from switchboard.interceptors import carried_client_span, end_carried_span
from switchboard.v1 import realtime_pb2, realtime_pb2_grpc

log = logging.getLogger(__name__)

SESSION_METHOD = "/switchboard.v1.RealtimeService/Session"
# A `RealtimeMuxRequestFrame` waiting to be sent, as its message's fields.
_Frame = dict[str, Any]


class MuxBroken(grpc.RpcError):  # type: ignore[misc]
    """The `Sessions` call a session ran on ended under it."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class MuxedSession:
    """One voice session on a `VoiceMux`: what a `Session` call is to its caller."""

    def __init__(
        self, opened: _Opened, number: int, span: Span | None, carrier: dict[str, str]
    ) -> None:
        self._opened = opened
        self.number = number
        self._carrier = carrier  # the trace context, sent with the first frame
        self._responses: deque[realtime_pb2.RealtimeResponse] = deque()
        self._error: MuxBroken | None = None
        self._ended = False
        self._ready = asyncio.Event()
        self._span = span
        self.pump: asyncio.Task[None] | None = None

    async def __aiter__(self) -> AsyncIterator[realtime_pb2.RealtimeResponse]:
        while True:
            while self._responses:
                yield self._responses.popleft()
            if self._error is not None:
                raise self._error
            if self._ended:
                return
            self._ready.clear()
            await self._ready.wait()

    def write(self, request: realtime_pb2.RealtimeRequest) -> None:
        """Send one request of the session (after those written before it)."""
        self._put({"request": request})

    def write_events(self, events: list[bytes]) -> None:
        """Send client events upstream: the request `events`, built with the message."""
        self._put({"request": {"events": {"events": events}}})

    def done_writing(self) -> None:
        """No more requests (the session's requests stream ended)."""
        self._put({"done": True})

    def _put(self, frame: _Frame) -> None:
        if self.number not in self._opened.sessions:
            return  # ended or left: the broker has nothing more to hear of it
        frame["session"] = self.number
        if self._carrier:
            frame["trace_context"], self._carrier = self._carrier, {}
        self._opened.put(frame)

    def cancel(self) -> None:
        """Leave the session: the broker cancels it, as a cancelled `Session` call."""
        if not self._ended:
            self._ended = True
            self._opened.leave(self)
            self._end_span(cancelled=True)
        if self.pump is not None:
            self.pump.cancel()
        self._ready.set()

    def deliver(self, frame: realtime_pb2.RealtimeMuxResponseFrame) -> bool:
        """Take one frame of the broker's; True when it ended the session."""
        if frame.WhichOneof("kind") == "response":
            self._responses.append(frame.response)
        else:
            self._ended = True
            self._end_span()
        self._ready.set()
        return self._ended

    def fail(self, error: MuxBroken) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._end_span(error=True)
        if self.pump is not None:
            self.pump.cancel()
        self._ready.set()

    def _end_span(self, *, cancelled: bool = False, error: bool = False) -> None:
        span, self._span = self._span, None
        if span is not None:
            failed = ServiceUnavailable("The broker service is unavailable.") if error else None
            end_carried_span(span, failed, cancelled=cancelled)


class _Opened:
    """One opening of the call: its sessions, and the task that writes their frames."""

    def __init__(self, stub: realtime_pb2_grpc.RealtimeServiceStub) -> None:
        self.call = stub.Sessions()
        self.sessions: dict[int, MuxedSession] = {}
        self._frames: list[_Frame] = []
        self._wake = asyncio.Event()
        self.writer = asyncio.create_task(self._write())

    def put(self, frame: _Frame) -> None:
        self._frames.append(frame)
        self._wake.set()

    def leave(self, session: MuxedSession) -> None:
        if self.sessions.pop(session.number, None) is not None and not self.writer.done():
            self.put({"session": session.number, "cancel": True})

    async def _write(self) -> None:
        # A call that ended refuses writes; its reader fails the sessions on it.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            while True:
                await self._wake.wait()
                self._wake.clear()
                frames, self._frames = self._frames, []
                # protobuf takes a message's fields as a dict (its stubs do not say so).
                message = realtime_pb2.RealtimeMuxRequest(frames=frames)  # type: ignore[arg-type]
                await self.call.write(message)


class VoiceMux:
    """This gateway's voice sessions at one broker, over one `Sessions` call (see the
    module); two for a while when the broker drains."""

    def __init__(self, stub: realtime_pb2_grpc.RealtimeServiceStub, target: str) -> None:
        self._stub = stub
        self._target = target  # HOST:PORT, for the sessions' spans
        self._opened: _Opened | None = None  # where new sessions go
        self._readers: dict[_Opened, asyncio.Task[None]] = {}
        self._numbers = 0

    def Session(
        self, requests: AsyncIterator[realtime_pb2.RealtimeRequest] | None = None
    ) -> MuxedSession:
        """Start a session whose requests are written to it, or are `requests`
        (the first an `open` or `attach`)."""
        opened = self._opened
        if opened is None:
            opened = self._opened = _Opened(self._stub)
            self._readers[opened] = asyncio.create_task(self._read(opened))
        self._numbers += 1
        traced = carried_client_span(SESSION_METHOD, self._target, None)
        span, carrier = traced if traced is not None else (None, {})
        session = MuxedSession(opened, self._numbers, span, carrier)
        opened.sessions[session.number] = session
        if requests is not None:
            session.pump = asyncio.create_task(_pump(opened, session, requests))
        return session

    async def close(self) -> None:
        """Fail the sessions still running and end the calls."""
        self._opened = None
        readers, self._readers = self._readers, {}
        tasks: list[asyncio.Task[None]] = []
        for opened, reader in readers.items():
            opened.call.cancel()
            _fail_all(opened, MuxBroken("The gateway is shutting down."))
            tasks += [opened.writer, reader]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, opened: _Opened) -> None:
        """Hand each frame to its session, until the call ends."""
        error = MuxBroken("The broker service ended the call.")
        try:
            async for response in opened.call:
                for frame in response.frames:
                    session = opened.sessions.get(frame.session)
                    if session is not None and session.deliver(frame):
                        del opened.sessions[frame.session]
                if response.draining and self._opened is opened:
                    # New sessions go on a new call; this one ends after its sessions.
                    self._opened = None
        except grpc.RpcError as exc:
            error = MuxBroken(f"The broker service is unavailable ({exc.code().name}).")
        except asyncio.CancelledError:
            error = MuxBroken("The gateway is shutting down.")
            raise
        finally:
            if self._opened is opened:
                self._opened = None
            self._readers.pop(opened, None)
            opened.writer.cancel()
            if opened.sessions:
                log.warning("voice stream broke", extra={"sessions": len(opened.sessions)})
            _fail_all(opened, error)


async def _pump(
    opened: _Opened, session: MuxedSession, requests: AsyncIterator[realtime_pb2.RealtimeRequest]
) -> None:
    """Write the session's requests, in order, then `done`."""
    async for request in requests:
        if session.number not in opened.sessions:
            return
        session.write(request)
    session.done_writing()


def _fail_all(opened: _Opened, error: MuxBroken) -> None:
    sessions, opened.sessions = opened.sessions, {}
    for session in sessions.values():
        session.fail(error)
