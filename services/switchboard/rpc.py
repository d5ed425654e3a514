"""gRPC plumbing shared by the services: serving with health and drain, dialing.

`serve()` runs a grpc.aio server with the standard `grpc.health.v1` service,
optionally driven by a readiness probe (the session service reports NOT_SERVING
while Redis does not answer), and on SIGTERM/SIGINT marks itself NOT_SERVING,
stops accepting calls and lets in-flight calls finish for `grace_s`.
`channel()` dials a backend with settings that reconnect fast after a restart.

While tracing is on (`switchboard.tracing`), both carry the trace context: a
channel's calls get a CLIENT span each, sent along as W3C `traceparent`
metadata, and the server continues that trace in a SERVER span per call (the
health service excepted). While it is off no interceptor is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from switchboard import tracing
from switchboard.config import ConfigError
from switchboard.errors import GRPC_CODE_KEY
from switchboard.telemetry import configure_logging

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Reconnect quickly after a backend restarts (gRPC's default backoff grows to
# two minutes, which would keep a recovered backend unused for that long).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def channel(target: str) -> grpc.aio.Channel:
    interceptors = client_interceptors(target) if tracing.enabled() else None
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)


async def check_health(target_channel: grpc.aio.Channel, timeout_s: float = 1.0) -> bool:
    """True when the backend behind the channel answers SERVING."""
    stub = health_pb2_grpc.HealthStub(target_channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(reply.status == SERVING)


async def serve(
    name: str,
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    *,
    probe: Callable[[], Awaitable[bool]] | None = None,
    probe_interval_s: float = 1.0,
    grace_s: float = 10.0,
    stop: asyncio.Event | None = None,
    metrics: tuple[str, CollectorRegistry] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain for `grace_s`.

    Args:
        name: the full gRPC service name, reported by the health service.
        listen: HOST:PORT to bind.
        register: adds the service's servicers to the server.
        probe: readiness check; while it returns False health is NOT_SERVING.
        metrics: HOST:PORT and the registry to serve at `/metrics` over HTTP
            (a small thread of prometheus_client's), when given.
    """
    interceptors = [TracingServerInterceptor()] if tracing.enabled() else None
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    await server.start()

    async def set_status(status: int) -> None:
        await health_servicer.set("", status)
        await health_servicer.set(name, status)

    await set_status(SERVING if probe is None else NOT_SERVING)
    log.info("listening", extra={"address": listen, "grpc_service": name})
    if metrics is not None:
        address, registry = metrics
        host, _, port = address.rpartition(":")
        try:
            start_http_server(int(port), addr=host, registry=registry)
        except OSError as exc:
            # Metrics are not worth refusing to serve for; say so loudly.
            log.error("metrics endpoint not started", extra={"address": address, "error": str(exc)})
        else:
            log.info("metrics listening", extra={"address": address})

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    async def watch() -> None:
        assert probe is not None
        last: bool | None = None
        while True:
            try:
                ok = await probe()
            except Exception:
                ok = False
            if ok != last:
                await set_status(SERVING if ok else NOT_SERVING)
                log.info("readiness changed", extra={"ready": ok})
                last = ok
            await asyncio.sleep(probe_interval_s)

    watcher = asyncio.create_task(watch()) if probe is not None else None
    try:
        await stop.wait()
    finally:
        log.info("draining", extra={"grace_s": grace_s})
        if watcher is not None:
            watcher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_s)
        log.info("stopped")


class _Settings(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=_Settings)


def main(
    service: str, load: Callable[[], S], run: Callable[[S], Coroutine[Any, Any, None]]
) -> None:
    """The entry point of a backend: load settings, configure logs, run on uvloop.

    A `ConfigError` from `load` (or from the `OTEL_*` variables) ends the
    process with status 2 and one line naming the variable, never a traceback.
    Queued spans are flushed when `run` returns.
    """
    try:
        settings = load()
        traces = tracing.configure_tracing(service)
    except ConfigError as exc:
        print(f"{service}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service, settings.log_level)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(settings))
        else:
            uvloop.run(run(settings))
    finally:
        if traces is not None:
            traces.shutdown()


# --- trace context over gRPC ---------------------------------------------------------

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
        if method.startswith(_UNTRACED):
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
    """A SERVER span per call, the child of the caller's span when `traceparent` came along.

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
            with self._running(span, context), trace.use_span(span, end_on_exit=False):
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
