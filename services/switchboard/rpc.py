"""gRPC plumbing shared by the services: serving with health and drain, dialing.

`serve()` runs a grpc.aio server with the standard `grpc.health.v1` service,
optionally driven by a readiness probe (the session service reports NOT_SERVING
while Redis does not answer), and on SIGTERM/SIGINT marks itself NOT_SERVING,
stops accepting calls and lets in-flight calls finish for `grace_s`.
`channel()` dials a backend with settings that reconnect fast after a restart.

While tracing is on (`switchboard.telemetry.tracing`), both carry the trace context
(`switchboard.interceptors`); while it is off no interceptor is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from switchboard.config import ConfigError
from switchboard.interceptors import TracingServerInterceptor, client_interceptors
from switchboard.telemetry import tracing
from switchboard.telemetry.logs import configure_logging

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The initial metadata in which a broker names itself (HOST:PORT) on every call
# it streams: where Cancel and Attach for that call go (broker.proto).
BROKER_METADATA_KEY = "switchboard-broker"

# The calls a broker `Stream` carries, named (in their spans, on both sides) as
# their own RPCs are.
BROKER_GENERATE = "switchboard.v1.BrokerService/Generate"
BROKER_ATTACH = "switchboard.v1.BrokerService/Attach"

# The largest gRPC message either side sends or takes. gRPC's default (4 MiB)
# is less than the closing events of a long response, which carry its whole
# text a few times over and are recorded in one append.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a backend restarts (gRPC's default backoff grows to
    # two minutes, which would keep a recovered backend unused for that long).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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
    on_drain: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain for `grace_s`.

    Args:
        name: the full gRPC service name, reported by the health service.
        listen: HOST:PORT to bind.
        register: adds the service's servicers to the server.
        probe: readiness check; while it returns False health is NOT_SERVING.
        on_drain: called when the drain starts, before in-flight calls are
            waited for (a long-lived stream can then wind itself down).
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
        if on_drain is not None:
            on_drain()
        await server.stop(grace_s)
        log.info("stopped")


class _Settings(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=_Settings)


# Container allocations between two young-generation collections (CPython's
# default is 700). The token path allocates a few dicts and messages per delta,
# nearly all freed by reference counting; collecting every 700 allocations
# cost the gateway ~7% of its CPU at 200 paced streams, the broker ~4% and the
# session service ~2% (gc.callbacks, thread time); 10,000 cost the gateway
# about 2% (docs/performance.md#the-gateways-cpu-per-token).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Leave what start-up made (modules, classes, settings) out of every later
    garbage collection, and collect young objects less often. Garbage cycles
    made while serving are still collected.

    A full collection walks every tracked object; in a gateway or a broker most
    of them are the ~50,000 the imports made, which never die. Frozen, a full
    collection in the middle of a burst of voice sessions takes a few
    milliseconds instead of 40-120 ms: a pause the clients hear as a gap in the
    audio (docs/voice.md#performance).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


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
    tune_gc()
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
