"""The gateway's model calls at one broker, over one gRPC stream.

Every model call the gateway makes at a broker (a Generate, or an Attach to a
call another gateway started) runs over one bidirectional `Stream` call to that
broker (proto/switchboard/v1/broker.proto; the broker's side is
broker/multiplex.py). The broker answers in batches, one message for what many
calls produced since the last, so a token does not cost a gRPC message of its
own, here nor there. A `BrokerStream` numbers the calls, sends their requests
in order, and hands each call's events to its `StreamedCall`, the `ModelCall`
the turn reads. The stream opens with the first call and again after it broke;
when it breaks (the broker died, the network), each call on it fails as a
Generate call would have (`service_unavailable`, from its gRPC status). In a
traced turn each call has the CLIENT span its Generate or Attach call would
have had, its trace context carried in the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from opentelemetry.trace import Span

from switchboard.errors import ServiceUnavailable, SwitchboardError, from_rpc_error
from switchboard.interceptors import carried_client_span, end_carried_span
from switchboard.rpc import BROKER_ATTACH, BROKER_GENERATE, BROKER_METADATA_KEY
from switchboard.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)


class StreamedCall:
    """One model call on a `BrokerStream`: a `ModelCall` (backends.py).

    Followed (`follow`), the call hands each event to its handler from the
    stream's reader as it arrives, and wakes the follower's task only when
    the call ends; iterated, it queues the events for the iterating task.
    """

    def __init__(
        self, stream: BrokerStream, opened: _Opened, number: int, span: Span | None
    ) -> None:
        self._stream = stream
        self._opened = opened
        self.number = number
        self._events: deque[broker_pb2.GenerateEvent] = deque()
        self._error: SwitchboardError | None = None
        self._ended = False
        self._ready = asyncio.Event()
        # While followed: the handler, what it raised, and the follower's wake-up.
        self._handle: Callable[[broker_pb2.GenerateEvent], None] | None = None
        self._raised: Exception | None = None
        self._ended_waiter: asyncio.Future[None] | None = None
        # The CLIENT span of the call, as a Generate call would have had (traced turns).
        self._span = span

    async def broker(self) -> str:
        """The address the broker names itself by, once the stream has started."""
        return await self._opened.broker()

    async def __aiter__(self) -> AsyncIterator[broker_pb2.GenerateEvent]:
        while True:
            while self._events:
                yield self._events.popleft()
            if self._error is not None:
                raise self._error
            if self._ended:
                return
            self._ready.clear()
            await self._ready.wait()

    async def follow(self, handle: Callable[[broker_pb2.GenerateEvent], None]) -> None:
        """See `ModelCall.follow`: the events queued so far, then each as the
        stream's reader takes it."""
        while self._events:
            handle(self._events.popleft())
        self._handle = handle
        try:
            while self._raised is None and self._error is None and not self._ended:
                self._ended_waiter = asyncio.get_running_loop().create_future()
                await self._ended_waiter
        finally:
            self._handle = self._ended_waiter = None
        if self._raised is not None:
            raise self._raised
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop following the call; the broker orphans it unless it was cancelled there."""
        if not self._ended:
            self._ended = True
            self._stream.leave(self)
            self._end_span(None, cancelled=True)
        self._wake()

    def deliver(self, batch: broker_pb2.CallEvents) -> bool:
        """Take the call's part of a response; True when it ended the call."""
        # Each access to a repeated field or oneof makes Python objects: once each.
        events = batch.events
        handle = self._handle
        if handle is None:
            self._events.extend(events)
        else:
            self._hand(handle, events)
        if batch.HasField("failure"):
            self.fail(error_of(batch.failure))
        elif events and events[-1].HasField("finished"):
            self._ended = True
            self._end_span(None)
            self._wake()
        elif handle is None:
            self._ready.set()
        return self._ended

    def _hand(
        self,
        handle: Callable[[broker_pb2.GenerateEvent], None],
        events: Sequence[broker_pb2.GenerateEvent],
    ) -> None:
        for number, event in enumerate(events):
            try:
                handle(event)
            except Exception as exc:
                # The follower raises it; nothing more is handed over.
                self._handle = None
                self._raised = exc
                self._events.extend(events[number + 1 :])
                self._wake()
                return

    def fail(self, error: SwitchboardError) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._end_span(error)
        self._wake()

    def _wake(self) -> None:
        """Wake the iterating or following task: the call ended, or its handler raised."""
        self._ready.set()
        waiter = self._ended_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end_span(self, error: SwitchboardError | None, *, cancelled: bool = False) -> None:
        span, self._span = self._span, None
        if span is not None:
            end_carried_span(span, error, cancelled=cancelled)


class _Opened:
    """One opening of the stream: its gRPC call, and the task that writes the
    requests queued for it, in order: each message carries every request that
    waits. A write takes a turn of the event loop at each end, so one message
    per request would cap how fast calls start (at saturation, a few dozen a
    second), and the requests of a busy gateway would queue without bound."""

    def __init__(self, stub: broker_pb2_grpc.BrokerServiceStub) -> None:
        self.requests: asyncio.Queue[broker_pb2.StreamRequest] = asyncio.Queue()
        self.call = stub.Stream()
        self.writer = asyncio.create_task(self._write())
        self.calls: dict[int, StreamedCall] = {}
        self.broken: SwitchboardError | None = None

    async def _write(self) -> None:
        # A call that ended refuses writes; its reader fails the calls on it.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            while True:
                batch = broker_pb2.StreamRequests(requests=[await self.requests.get()])
                while not self.requests.empty():
                    batch.requests.append(self.requests.get_nowait())
                await self.call.write(batch)

    async def broker(self) -> str:
        try:
            metadata = await self.call.initial_metadata()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service="broker") from None
        if metadata is None:  # the stream ended before it started
            raise self.broken or ServiceUnavailable("The broker service is unavailable.")
        return str(dict(metadata).get(BROKER_METADATA_KEY, ""))


class BrokerStream:
    """The model calls of this gateway at one broker, over one `Stream` call
    (two for a while when the broker drains: the old one ends after its calls)."""

    def __init__(self, stub: broker_pb2_grpc.BrokerServiceStub, target: str) -> None:
        self._stub = stub
        self._target = target  # HOST:PORT, for the calls' spans
        self._opened: _Opened | None = None  # where new calls go
        self._readers: dict[_Opened, asyncio.Task[None]] = {}  # every opening still read
        self._numbers = 0

    def generate(self, request: broker_pb2.GenerateRequest) -> StreamedCall:
        return self._start(broker_pb2.StreamRequest(generate=request), BROKER_GENERATE, request)

    def attach(self, request: broker_pb2.AttachRequest) -> StreamedCall:
        return self._start(broker_pb2.StreamRequest(attach=request), BROKER_ATTACH, request)

    def leave(self, call: StreamedCall) -> None:
        opened = call._opened
        if opened.calls.pop(call.number, None) is not None and not opened.writer.done():
            opened.requests.put_nowait(broker_pb2.StreamRequest(call=call.number, leave=True))

    async def close(self) -> None:
        """Fail the calls still running and end the streams."""
        self._opened = None
        readers, self._readers = self._readers, {}
        tasks = []
        for opened, reader in readers.items():
            opened.call.cancel()
            self._fail_all(opened, ServiceUnavailable("The gateway is shutting down."))
            tasks += [opened.writer, reader]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(
        self, request: broker_pb2.StreamRequest, method: str, call_request: Any
    ) -> StreamedCall:
        opened = self._opened
        if opened is None:
            opened = self._opened = _Opened(self._stub)
            self._readers[opened] = asyncio.create_task(self._read(opened))
        self._numbers += 1
        traced = carried_client_span(method, self._target, call_request)
        span = None
        if traced is not None:
            span, headers = traced
            request.trace_context.update(headers)
        call = StreamedCall(self, opened, self._numbers, span)
        opened.calls[call.number] = call
        request.call = call.number
        opened.requests.put_nowait(request)
        return call

    async def _read(self, opened: _Opened) -> None:
        """Hand each response's events to their calls, until the stream ends."""
        error: SwitchboardError = ServiceUnavailable("The broker service ended the stream.")
        try:
            async for response in opened.call:
                for batch in response.calls:
                    call = opened.calls.get(batch.call)
                    if call is not None and call.deliver(batch):
                        del opened.calls[batch.call]
                if response.draining and self._opened is opened:
                    # New calls go on a new stream; this one ends after its calls.
                    self._opened = None
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, service="broker")
        except asyncio.CancelledError:
            error = ServiceUnavailable("The gateway is shutting down.")
            raise
        finally:
            if self._opened is opened:
                self._opened = None
            self._readers.pop(opened, None)
            opened.writer.cancel()
            opened.broken = error
            if opened.calls:
                extra = {"calls": len(opened.calls), "code": error.name}
                log.warning("broker stream broke", extra=extra)
            self._fail_all(opened, error)

    @staticmethod
    def _fail_all(opened: _Opened, error: SwitchboardError) -> None:
        calls, opened.calls = opened.calls, {}
        for call in calls.values():
            call.fail(error)


def error_of(failure: broker_pb2.CallFailure) -> SwitchboardError:
    """The `SwitchboardError` a call's `CallFailure` stands for."""
    return SwitchboardError(
        failure.message,
        code=failure.code,
        param=failure.param or None,
        retry_after=failure.retry_after_s or None,
    )
