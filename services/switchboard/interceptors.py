"""gRPC interceptors that carry the trace context between the services.

A channel's calls made while a span is current get a CLIENT span each
(`client_interceptors`), sent along as W3C `traceparent` metadata; the server
continues that trace in a SERVER span per call (`TracingServerInterceptor`).
Both are installed by `switchboard.rpc` only while tracing is on. Calls made
outside any span (background work: event-log batches, lease renewals, the
session created at connect) and health checks are not traced, so every trace
is an operation someone asked for.
A call carried inside a long-lived stream (a model call on the broker's
`Stream`) gets the same pair of spans from `carried_client_span` and
`carried_server_span`, its trace context in the request instead of metadata.
Spans carry the RPC attributes of the OpenTelemetry conventions
(`rpc.system.name`, `rpc.method`, `rpc.response.status_code`, `server.*`), the
tenant, session and response ids of the request, and on failure `error.type`:
the backend's error code (never its message).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, TracerProvider

from switchboard.errors import GRPC_CODE_KEY, SwitchboardError
from switchboard.telemetry import tracing

# Probed every second by readiness checks: spans of them would only be noise.
_UNTRACED = ("grpc.health.v1.Health/",)
_RPC_SYSTEM = {"rpc.system.name": "grpc"}


def _method(raw: str | bytes) -> str:
    """`switchboard.v1.SessionService/GetItem` from the path `/switchboard.v1...`."""
    name = raw.decode() if isinstance(raw, bytes) else raw
    return name.lstrip("/")


def _request_ids(request: Any) -> dict[str, str]:
    """The tenant, session and response ids a Switchboard request carries (those it has)."""
    values = [getattr(request, field, "") for field in ("tenant_id", "session_id", "response_id")]
    return tracing.ids(*(value if isinstance(value, str) else "" for value in values))


def _error_type(code: grpc.StatusCode | None, trailers: Any) -> str | None:
    """Our error code name when the trailers carry one, else the gRPC status name."""
    for key, value in trailers or ():
        if key == GRPC_CODE_KEY:
            return str(value)
    if code is None or code == grpc.StatusCode.OK:
        return None
    return str(code.name)


def _end_rpc(span: Span, code: grpc.StatusCode | None, trailers: Any) -> None:
    if code is not None:
        span.set_attribute("rpc.response.status_code", code.name)
    if code == grpc.StatusCode.CANCELLED:
        span.set_attribute(tracing.CANCELLED, True)
    else:
        error = _error_type(code, trailers)
        if error is not None:
            tracing.record_error(span, error)
    span.end()


def client_interceptors(target: str, provider: TracerProvider | None = None) -> list[Any]:
    """The interceptors that trace a channel's calls to `target` (HOST:PORT).

    A CLIENT span per call, made the parent of the server's span by the
    `traceparent` metadata; a unary span ends with the call, a server-streaming
    one when the stream ends, is cancelled or fails. `error.type` is the
    backend's error code name. `provider` defaults to the installed one.
    """
    spans = _ClientSpans(target, provider)
    # grpc.aio files each interceptor under one call type only: one object per type.
    return [_UnaryClientTracing(spans), _StreamClientTracing(spans)]


class _ClientSpans:
    def __init__(self, target: str, provider: TracerProvider | None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=provider)
        host, _, port = target.rpartition(":")
        self._server: dict[str, str | int] = {"server.address": host or target}
        if port.isdigit():
            self._server["server.port"] = int(port)
        self._ending: set[asyncio.Task[None]] = set()

    def start(self, details: Any, request: Any) -> tuple[Span, Any] | None:
        """The call's span and its details with the trace context added; None if untraced."""
        method = _method(details.method)
        if method.startswith(_UNTRACED) or not trace.get_current_span().get_span_context().is_valid:
            # Only calls made for a traced operation (a turn, a served call) are traced:
            # background calls (event-log batches, lease renewals) would each be a trace
            # of their own, many per turn.
            return None
        attributes = {**_RPC_SYSTEM, "rpc.method": method, **self._server, **_request_ids(request)}
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in tracing.headers(span).items():
            metadata.add(key, value)
        return span, details._replace(metadata=metadata)

    def end_when_done(self, span: Span, call: Any) -> None:
        """End the span when the call is over, with its status."""

        async def end() -> None:
            # The status is only readable by awaiting it; the call is over, so it is there.
            _end_rpc(span, await call.code(), await call.trailing_metadata())

        def done(_call: Any) -> None:
            task = asyncio.get_running_loop().create_task(end())
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

        call.add_done_callback(done)


class _UnaryClientTracing(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        started = self._spans.start(details, request)
        if started is None:
            return await continuation(details, request)
        span, details = started
        try:
            call = await continuation(details, request)
            # The status arrives with the end of the call; failures stay the caller's to raise.
            code = await call.code()
            trailers = await call.trailing_metadata() if code != grpc.StatusCode.OK else ()
        except asyncio.CancelledError:
            span.set_attribute(tracing.CANCELLED, True)
            span.end()
            raise
        except BaseException as exc:
            tracing.record_error(span, exc)
            span.end()
            raise
        _end_rpc(span, code, trailers)
        return call


class _StreamClientTracing(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        started = self._spans.start(details, request)
        if started is None:
            return await continuation(details, request)
        span, details = started
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            tracing.record_error(span, exc)
            span.end()
            raise
        self._spans.end_when_done(span, call)
        return call


class TracingServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A SERVER span per call that came with a `traceparent`, the child of the caller's span.

    The span is current while the servicer runs (for a server-streaming call,
    while it produces each message), so the servicer's own spans and log lines
    belong to it. It ends when the call does, with the status the servicer set.
    """

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=provider)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = _method(details.method)
        if handler is None or method.startswith(_UNTRACED):
            return handler
        parent = propagate.extract(dict(details.invocation_metadata or ()))
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return handler  # the caller traces nothing: neither does this side
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, parent),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, parent),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # Switchboard has no client-streaming calls

    def _start(self, method: str, parent: otel_context.Context, request: Any, context: Any) -> Span:
        attributes = {**_RPC_SYSTEM, "rpc.method": method, **_request_ids(request)}
        span = self._tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

        def done(_context: Any) -> None:
            # After a normal end the span has ended already (end() is then a no-op);
            # this ends the span of a call cancelled while it waited to send.
            if span.is_recording():
                _end_rpc(span, _code(context), context.trailing_metadata())

        context.add_done_callback(done)
        return span

    @contextlib.contextmanager
    def _running(self, span: Span, context: Any) -> Iterator[None]:
        """Attribute the end of a servicer call (normal, aborted, failed) to the span."""
        try:
            yield
        except asyncio.CancelledError:
            span.set_attribute(tracing.CANCELLED, True)
            span.end()
            raise
        except grpc.aio.AbortError:
            _end_rpc(span, _code(context), context.trailing_metadata())
            raise
        except Exception as exc:
            tracing.record_error(span, exc)
            span.set_attribute("rpc.response.status_code", grpc.StatusCode.UNKNOWN.name)
            span.end()
            raise

    def _unary(self, behavior: Any, method: str, parent: otel_context.Context) -> Any:
        async def traced(request: Any, context: Any) -> Any:
            span = self._start(method, parent, request, context)
            # Exceptions are not recorded as events: their messages may quote input.
            current = trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            )
            with self._running(span, context), current:
                response = await behavior(request, context)
            _end_rpc(span, _code(context) or grpc.StatusCode.OK, context.trailing_metadata())
            return response

        return traced

    def _stream(self, behavior: Any, method: str, parent: otel_context.Context) -> Any:
        async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
            span = self._start(method, parent, request, context)
            current = trace.set_span_in_context(span, parent)
            responses = behavior(request, context)
            with self._running(span, context):
                try:
                    while True:
                        # Current only while the servicer runs: a context attached
                        # across a `yield` could not be detached if the generator
                        # were closed from elsewhere.
                        token = otel_context.attach(current)
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                        finally:
                            otel_context.detach(token)
                        yield response
                finally:
                    await responses.aclose()
            _end_rpc(span, _code(context) or grpc.StatusCode.OK, context.trailing_metadata())

        return traced


def _code(context: Any) -> grpc.StatusCode | None:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else None


def carried_client_span(
    method: str, target: str, request: Any
) -> tuple[Span, dict[str, str]] | None:
    """A CLIENT span for a call carried over a stream rather than a gRPC call of its
    own, and the trace context that makes it the remote side's parent; None when
    no traced operation is current (as `client_interceptors` leaves such calls)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    host, _, port = target.rpartition(":")
    attributes: dict[str, str | int] = {
        **_RPC_SYSTEM,
        "rpc.method": method,
        "server.address": host or target,
        **_request_ids(request),
    }
    if port.isdigit():
        attributes["server.port"] = int(port)
    span = trace.get_tracer(__name__).start_span(
        method, kind=SpanKind.CLIENT, attributes=attributes
    )
    return span, tracing.headers(span)


def carried_server_span(method: str, carrier: Mapping[str, str], request: Any) -> Span | None:
    """The SERVER span of a carried call whose request brought a trace context, the
    child of the caller's span; None when it brought none."""
    parent = propagate.extract(dict(carrier))
    if not trace.get_current_span(parent).get_span_context().is_valid:
        return None
    attributes = {**_RPC_SYSTEM, "rpc.method": method, **_request_ids(request)}
    return trace.get_tracer(__name__).start_span(
        method, context=parent, kind=SpanKind.SERVER, attributes=attributes
    )


def end_carried_span(
    span: Span, error: SwitchboardError | None, *, cancelled: bool = False
) -> None:
    """End a carried call's span as its gRPC call's would end: OK, CANCELLED, or
    the error's status with its code as `error.type`."""
    if cancelled:
        span.set_attribute("rpc.response.status_code", grpc.StatusCode.CANCELLED.name)
        span.set_attribute(tracing.CANCELLED, True)
    elif error is None:
        span.set_attribute("rpc.response.status_code", grpc.StatusCode.OK.name)
    else:
        span.set_attribute("rpc.response.status_code", error.spec.grpc_status.name)
        tracing.record_error(span, error.name)
    span.end()
