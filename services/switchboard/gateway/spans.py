"""The gateway's spans: one trace per turn, one span per response in it.

A `response.create` starts a turn: `turn(...)` is the root span of a new trace
(a connection may live for hours, so it is named by attributes, not made a
parent), and each response of the turn (the first, and one more after each
round of server-side tools) is a `response(...)` span under it. The gRPC calls
the turn makes to session, broker and toolexec are CLIENT spans under those
(`switchboard.interceptors`), and each backend continues the trace from there.

Attributes are identifiers, statuses and counts: never prompt text or keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from switchboard.errors import SwitchboardError
from switchboard.telemetry import tracing
from switchboard.v1 import common_pb2

CONNECTION_ID = tracing.CONNECTION_ID


@contextmanager
def turn(
    tenant_id: str, session_id: str, connection_id: str, response_id: str, model: str
) -> Iterator[Span]:
    """The root span `realtime.turn` of the turn that `response_id` starts."""
    attributes = {
        **tracing.ids(tenant_id, session_id, response_id),
        CONNECTION_ID: connection_id,
        "gen_ai.conversation.id": session_id,
        "gen_ai.request.model": model,
    }
    with tracing.span(
        tracing.tracer(__name__),
        "realtime.turn",
        kind=SpanKind.SERVER,
        attributes=attributes,
        parent=Context(),  # a root: a turn never joins a trace that happens to be current
    ) as span:
        yield span


@contextmanager
def response(tenant_id: str, session_id: str, response_id: str, model: str) -> Iterator[Span]:
    """The span `realtime.response` of one response of the current turn."""
    attributes = {**tracing.ids(tenant_id, session_id, response_id), "gen_ai.request.model": model}
    with tracing.span(tracing.tracer(__name__), "realtime.response", attributes=attributes) as span:
        yield span


def response_done(
    status: str, reason: str | None, usage: common_pb2.Usage, error: SwitchboardError | None
) -> None:
    """Record on the current response span what `response.done` told the client."""
    span = trace.get_current_span()
    span.set_attributes(
        {
            "switchboard.response.status": status,
            "switchboard.usage.input_tokens": usage.input_tokens,
            "switchboard.usage.output_tokens": usage.output_tokens,
            "switchboard.usage.estimated": usage.estimated,
        }
    )
    if reason is not None:
        span.set_attribute("switchboard.response.reason", reason)
    if error is not None:
        tracing.record_error(span, error)
