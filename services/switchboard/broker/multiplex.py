"""Many model calls over one gRPC stream: the broker's side of `Stream`.

A gateway process opens one `Stream` per broker and runs every model call it
makes there over it (proto/switchboard/v1/broker.proto). A `CallStream` is one
such stream: it starts (`generate`), attaches to (`attach`) and leaves
(`leave`) calls by the caller's numbers, each call a `calls.Follower` like a
Generate call's, and it answers in batches. A follower with news marks its
call; the stream wakes, lets the event loop run once more so that the other
calls that have news by then join in, and takes from every marked follower
without waiting (`Follower.take`: consecutive deltas of one output merged).
One response then carries what all of them produced, so under load a token
costs a share of a message rather than a gRPC message of its own, and a lone
stream is not held back: nothing waits on a clock.

A draining broker (`drain`, at SIGTERM) says so in a response (`draining`),
refuses new calls on the stream with `service_unavailable`, and ends the
stream once its calls have ended, so the gRPC server's drain does not wait out
its grace for an idle stream; the gateway opens a new stream for new calls.

A traced call (its request carries a `trace_context`) gets the SERVER span
its Generate or Attach call would have had, current while the call starts so
that its model span is a child, ended when the call ends for this stream.

Backpressure is the stream's: while a response waits for gRPC flow control,
nothing is taken, followers fill up, and their pumps wait (`BUFFERED_EVENTS`),
as a Generate call's would. When the stream ends (the gateway left or died),
every call it still follows is detached: orphaned for a resume, as a cancelled
Generate call is.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable

from opentelemetry import trace
from opentelemetry.trace import Span

from switchboard.broker.calls import Follower
from switchboard.errors import ServiceUnavailable, SwitchboardError, invalid_value
from switchboard.interceptors import carried_server_span, end_carried_span
from switchboard.rpc import BROKER_ATTACH, BROKER_GENERATE
from switchboard.v1 import broker_pb2, common_pb2

Start = Callable[[broker_pb2.GenerateRequest], Follower]
Attach = Callable[[broker_pb2.AttachRequest], "Follower | SwitchboardError"]


class CallStream:
    """The calls of one `Stream`, by the caller's numbers; see the module docstring."""

    def __init__(self, start: Start, attach: Attach) -> None:
        self._start = start
        self._attach = attach
        self._followers: dict[int, Follower] = {}
        self._news: dict[int, None] = {}  # calls with news, in order of arrival
        self._failed: list[broker_pb2.CallEvents] = []  # refused before they started
        self._wake = asyncio.Event()
        self._requests_ended = False
        self._draining = False
        self._said_draining = False
        self._spans: dict[int, Span] = {}  # the SERVER spans of traced calls

    def handle(self, request: broker_pb2.StreamRequest) -> None:
        """Act on one request of the caller."""
        number = request.call
        action = request.WhichOneof("action")
        if action == "leave":
            left = self._followers.pop(number, None)
            self._news.pop(number, None)
            if left is not None:
                left.detach()
                self._end_span(number, None, cancelled=True)
            return
        if number in self._followers:
            self._fail(number, invalid_value("call", "This call number is in use on the stream."))
            return
        if self._draining and action in ("generate", "attach"):
            self._fail(number, ServiceUnavailable("The broker is shutting down."))
            return
        if action not in ("generate", "attach"):
            error = invalid_value("action", "A stream request must generate, attach or leave.")
            self._fail(number, error)
            return
        call_request = request.generate if action == "generate" else request.attach
        method = BROKER_GENERATE if action == "generate" else BROKER_ATTACH
        span = carried_server_span(method, request.trace_context, call_request)
        follower: Follower | SwitchboardError
        if span is None:
            follower = self._follow(action, request)
        else:
            # Current while the call starts: its pump's task, and so its model span, is a child.
            with trace.use_span(span, end_on_exit=False):
                follower = self._follow(action, request)
        if isinstance(follower, SwitchboardError):
            self._fail(number, follower)
            if span is not None:
                end_carried_span(span, follower)
            return
        self._followers[number] = follower
        if span is not None:
            self._spans[number] = span
        follower.on_news = functools.partial(self._mark, number)
        self._mark(number)  # an attached call starts with its snapshot

    def _follow(
        self, action: str, request: broker_pb2.StreamRequest
    ) -> Follower | SwitchboardError:
        if action == "generate":
            return self._start(request.generate)
        return self._attach(request.attach)

    def requests_ended(self) -> None:
        """The caller sends no more: the stream ends once its calls have."""
        self._requests_ended = True
        self._wake.set()

    def drain(self) -> None:
        """The broker drains: say so, refuse new calls, end once the calls have."""
        self._draining = True
        self._wake.set()

    def close(self) -> None:
        """The stream is over: detach (orphan) every call it still follows."""
        followers, self._followers = self._followers, {}
        self._news.clear()
        for number, follower in followers.items():
            follower.detach()
            self._end_span(number, None, cancelled=True)

    async def responses(self) -> AsyncIterator[broker_pb2.StreamResponse]:
        """The stream's responses, each with what every call with news has."""
        while not self._over():
            await self._wake.wait()
            self._wake.clear()
            # One more turn of the loop: calls whose news is ready now join in.
            await asyncio.sleep(0)
            response = self.collect()
            if self._draining and not self._said_draining:
                response.draining = self._said_draining = True
            if response.calls or response.draining:
                yield response

    def _over(self) -> bool:
        """Nothing more to send, and nothing more will come."""
        ending = self._requests_ended or (self._draining and self._said_draining)
        return ending and not self._followers and not self._failed

    def collect(self) -> broker_pb2.StreamResponse:
        """Take what waits at every call with news, without waiting."""
        response = broker_pb2.StreamResponse()
        response.calls.extend(self._failed)
        self._failed.clear()
        news, self._news = self._news, {}
        for number in news:
            follower = self._followers.get(number)
            if follower is None:
                continue
            events, error, ended = follower.take()
            if not (events or ended):
                continue
            entry = response.calls.add(call=number)
            add = entry.events.add
            for event in events:
                if isinstance(event, str):
                    # A text delta's message is built here, in place: once per batch.
                    add().text_delta.text = event
                else:
                    entry.events.append(event)
            if error is not None:
                entry.failure.CopyFrom(failure_of(error))
            if ended:
                follower.on_news = None
                del self._followers[number]
                failure = None if error is None else _as_switchboard_error(error)
                self._end_span(number, failure, cancelled=failure is None and error is not None)
        return response

    def _end_span(
        self, number: int, error: SwitchboardError | None, *, cancelled: bool = False
    ) -> None:
        span = self._spans.pop(number, None)
        if span is not None:
            end_carried_span(span, error, cancelled=cancelled)

    def _mark(self, number: int) -> None:
        self._news[number] = None
        self._wake.set()

    def _fail(self, number: int, error: SwitchboardError) -> None:
        entry = broker_pb2.CallEvents(call=number, failure=failure_of(error))
        self._failed.append(entry)
        self._wake.set()


def _as_switchboard_error(error: Exception) -> SwitchboardError | None:
    """A follower's end as an error; None for a cancelled call (`CallCancelled`)."""
    return error if isinstance(error, SwitchboardError) else None


def failure_of(error: Exception) -> broker_pb2.CallFailure:
    """The `CallFailure` of how a follower ended: what Generate's status would say."""
    if not isinstance(error, SwitchboardError):
        # CallCancelled: a Generate call ends CANCELLED, which its caller reads so.
        error = ServiceUnavailable("The call to the broker service was cancelled.")
    return broker_pb2.CallFailure(
        code=common_pb2.ErrorCode.ValueType(error.code),
        message=error.message,
        param=error.param or "",
        retry_after_s=error.retry_after or 0.0,
    )
