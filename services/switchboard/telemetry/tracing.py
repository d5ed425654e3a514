"""Traces for every service: OpenTelemetry spans, exported over OTLP/HTTP when configured.

Tracing is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
is set (and `OTEL_SDK_DISABLED` is not true, `OTEL_TRACES_EXPORTER` not `none`).
Then `configure_tracing(service)` installs the SDK's tracer provider with a
batch processor and the OTLP/HTTP exporter, and the gRPC channels and servers
of `switchboard.rpc` propagate the trace context (`switchboard.interceptors`).
Otherwise nothing is installed: the API's no-op tracer makes the few spans per
response cost next to nothing, and no gRPC interceptor runs at all.

Call order: `configure_tracing(service)` once at start, before any channel or
server is built; `Tracing.shutdown()` at exit flushes the spans still queued
(the interpreter's exit does it too, for a service that does not call it).

Spans carry identifiers and counts (tenant, session, response and call ids,
models, token counts), never prompt text, tool arguments, keys or secrets;
docs/observability.md lists every span and attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from switchboard.config import ConfigError, Env
from switchboard.errors import SwitchboardError

# Attributes of Switchboard's own (the GenAI and RPC ones follow OpenTelemetry's conventions).
TENANT_ID = "switchboard.tenant.id"
SESSION_ID = "switchboard.session.id"
RESPONSE_ID = "switchboard.response.id"
CONNECTION_ID = "switchboard.connection.id"
CANCELLED = "switchboard.cancelled"
ERROR_TYPE = "error.type"

_PROTOCOL = "http/protobuf"
_TRACES_PATH = "v1/traces"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where spans go, from the standard `OTEL_*` variables (docs/configuration.md).

    Only the variables that decide whether and where to export are read here;
    the exporter and the batch processor read their own (`OTEL_EXPORTER_OTLP_HEADERS`,
    `_TIMEOUT`, `_COMPRESSION`, `OTEL_BSP_*`), and the SDK the sampler
    (`OTEL_TRACES_SAMPLER`) and `OTEL_RESOURCE_ATTRIBUTES`.
    """

    endpoint: str
    service_name: str

    @classmethod
    def from_environ(
        cls, service: str, environ: Mapping[str, str] | None = None
    ) -> TracingSettings | None:
        """The settings, or None when tracing is off.

        Raises:
            ConfigError: an exporter or protocol other than OTLP over HTTP/protobuf,
                or an endpoint that is not an http(s) URL.
        """
        env = Env(environ)
        if env.boolean("OTEL_SDK_DISABLED", False):
            return None
        exporter = env.string("OTEL_TRACES_EXPORTER", "otlp")
        if exporter == "none":
            return None
        if exporter != "otlp":
            raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
        for key in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.optional(key)
            if protocol is not None and protocol != _PROTOCOL:
                raise ConfigError(f"{key} must be {_PROTOCOL}, got {protocol!r}")
            if protocol is not None:
                break
        endpoint = env.optional("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        key = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        if endpoint is None:
            base = env.optional("OTEL_EXPORTER_OTLP_ENDPOINT")
            if base is None:
                return None
            # The general endpoint is a base URL; the signal path goes after it.
            endpoint, key = f"{base.rstrip('/')}/{_TRACES_PATH}", "OTEL_EXPORTER_OTLP_ENDPOINT"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            # Name the variable but not the value: a URL may carry a password.
            raise ConfigError(f"{key} must be an http or https URL")
        name = (
            env.optional("OTEL_SERVICE_NAME")
            or _resource_attribute(env.string("OTEL_RESOURCE_ATTRIBUTES", ""), "service.name")
            or f"switchboard-{service}"
        )
        return cls(endpoint=endpoint, service_name=name)


def _resource_attribute(raw: str, key: str) -> str | None:
    """One attribute of an `OTEL_RESOURCE_ATTRIBUTES` value (`k=v,k2=v2`, URL-encoded)."""
    for pair in raw.split(","):
        name, sep, value = pair.partition("=")
        if sep and name.strip() == key and value.strip():
            return unquote(value.strip())
    return None


class Tracing:
    """The tracer provider a service installed; `shutdown()` flushes it at exit."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def shutdown(self) -> None:
        """Export the spans still queued, then stop the exporter (once)."""
        self.provider.shutdown()


def build_provider(settings: TracingSettings) -> TracerProvider:
    """A tracer provider exporting to `settings.endpoint` in batches (not installed)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    try:
        version = importlib.metadata.version("switchboard")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    resource = Resource.create({"service.name": settings.service_name, "service.version": version})
    # Flushed at interpreter exit too, for a service that does not call `shutdown()`.
    provider = TracerProvider(resource=resource, shutdown_on_exit=True)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
    return provider


def configure_tracing(service: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Install the SDK tracer provider when the environment asks for traces.

    Args:
        service: `gateway`, `session`, `broker` or `toolexec`; the default
            `service.name` is `switchboard-<service>`.

    Returns:
        The installed tracing, to shut down at exit; None when tracing is off.

    Raises:
        ConfigError: a bad `OTEL_*` variable (see `TracingSettings`).
    """
    settings = TracingSettings.from_environ(service, environ)
    if settings is None:
        return None
    provider = build_provider(settings)
    trace.set_tracer_provider(provider)
    return Tracing(provider)


def enabled() -> bool:
    """Whether this process exports spans (an SDK tracer provider is installed)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def tracer(name: str) -> Tracer:
    """The tracer of a Switchboard module (a no-op one while tracing is off)."""
    return trace.get_tracer(name)


def ids(tenant_id: str = "", session_id: str = "", response_id: str = "") -> dict[str, str]:
    """The identifier attributes that are set (empty ones are left out)."""
    attributes = {}
    if tenant_id:
        attributes[TENANT_ID] = tenant_id
    if session_id:
        attributes[SESSION_ID] = session_id
    if response_id:
        attributes[RESPONSE_ID] = response_id
    return attributes


def record_error(span: Span, error: BaseException | str) -> None:
    """Mark the span failed with a low-cardinality `error.type`, never a message.

    A `SwitchboardError` gives its code name (`upstream_timeout`), any other
    exception its class name; messages stay out because they may quote input.
    """
    if isinstance(error, str):
        kind = error
    elif isinstance(error, SwitchboardError):
        kind = error.name
    else:
        kind = type(error).__name__
    span.set_attribute(ERROR_TYPE, kind)
    span.set_status(Status(StatusCode.ERROR, kind))


@contextlib.contextmanager
def span(
    source: Tracer,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    parent: Context | None = None,
) -> Iterator[Span]:
    """A current span for the block; an exception marks it failed (`record_error`).

    A cancelled task is not a failure: the span gets `switchboard.cancelled`.
    Exceptions are not recorded as events (their messages and frames could
    quote input); `error.type` names them. `parent` replaces the current
    context as the parent (`Context()` makes a root span).
    """
    with source.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except asyncio.CancelledError:
            current.set_attribute(CANCELLED, True)
            raise
        except Exception as exc:
            record_error(current, exc)
            raise


def headers(target: Span) -> dict[str, str]:
    """The W3C trace context headers that make `target` the parent of the remote side."""
    carrier: dict[str, str] = {}
    if target.get_span_context().is_valid:
        propagate.inject(carrier, context=trace.set_span_in_context(target))
    return carrier
