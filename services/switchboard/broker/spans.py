"""The span of one Generate call's model request, after the OpenTelemetry GenAI conventions.

`ChatSpan` is the CLIENT span `chat {model}` with the `gen_ai.*` attributes:
the operation, the provider flavour (the OpenAI API, whatever server speaks
it), the requested and answering models, max tokens, the token usage, the
finish reason and the time to the first chunk, plus the upstream's name and
address, the attempts made and the tenant, session and response ids. It never
holds prompt text, tool arguments or the upstream's key. One span covers every
attempt of a call (retries and failover), as the conventions ask.

Call order: `ChatSpan(request, progress)` when the call starts; run the call
inside `with span.current(target):`, which starts the span and makes it the
current span of the running task for the block (so the upstream HTTP request
carries it as `traceparent`, see `chat_stream.ChatStream`); `end(...)` once
when the call is over (a no-op when `current` never ran, as for a call
refused before routing). The block must not span a `yield`: the call runs in
a task of its own (its pump, see `calls`), so the span is attached once per
call, not once per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from switchboard.broker.routing import Target
from switchboard.broker.translate import ChunkTranslator
from switchboard.errors import SwitchboardError
from switchboard.telemetry import tracing
from switchboard.v1 import broker_pb2, common_pb2

# Every upstream speaks the OpenAI API; the conventions name the flavour by it.
PROVIDER = "openai"
_FINISH_REASONS = {
    broker_pb2.FINISH_REASON_STOP: "stop",
    broker_pb2.FINISH_REASON_LENGTH: "length",
    broker_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    broker_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


class CallProgress(Protocol):
    """What the span reads of a call's progress (`dispatch.Progress`)."""

    started: float
    translator: ChunkTranslator
    upstream: str
    upstream_model: str
    first_event: float | None
    attempts: int


class ChatSpan:
    """The model request span of one Generate call; see the module docstring."""

    def __init__(self, request: broker_pb2.GenerateRequest, progress: CallProgress) -> None:
        self._request = request
        self._progress = progress
        self._span: Span | None = None
        self._addresses: dict[str, str] = {}

    @contextmanager
    def current(self, target: Target) -> Iterator[None]:
        """Start the span and make it current in this task until the block ends."""
        self._addresses = {c.upstream.name: c.upstream.base_url for c in target.candidates}
        span = self._span = self._start()
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def _start(self) -> Span:
        request = self._request
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            # The name the conventions used before `gen_ai.provider.name`.
            "gen_ai.system": PROVIDER,
            "gen_ai.request.model": request.model,
            "gen_ai.request.stream": True,
            **tracing.ids(request.tenant_id, request.session_id, request.response_id),
        }
        if request.session_id:
            attributes["gen_ai.conversation.id"] = request.session_id
        if request.max_output_tokens > 0:
            attributes["gen_ai.request.max_tokens"] = request.max_output_tokens
        if request.HasField("temperature"):
            attributes["gen_ai.request.temperature"] = round(request.temperature, 6)
        return tracing.tracer(__name__).start_span(
            f"chat {request.model}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def end(
        self,
        *,
        finished: broker_pb2.Finished | None = None,
        error: SwitchboardError | None = None,
        cancelled: bool = False,
    ) -> None:
        """Record how the call ended and end the span (once; a no-op if it never started)."""
        span, self._span = self._span, None
        if span is None:
            return
        if not span.is_recording():
            # Tracing is off, or the trace is not sampled: no attributes to compute.
            span.end()
            return
        progress = self._progress
        translator = progress.translator
        usage: common_pb2.Usage = finished.usage if finished is not None else translator.usage()
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "switchboard.usage.estimated": usage.estimated,
            "switchboard.upstream.attempts": progress.attempts,
        }
        if progress.upstream:
            attributes["switchboard.upstream"] = progress.upstream
            attributes.update(_address(self._addresses.get(progress.upstream, "")))
        if progress.upstream_model:
            # The model actually asked of the upstream (a route may rename it).
            attributes["gen_ai.request.model"] = progress.upstream_model
            span.update_name(f"chat {progress.upstream_model}")
        if usage.cached_input_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_input_tokens
        if translator.response_model:
            attributes["gen_ai.response.model"] = translator.response_model
        if translator.response_id:
            attributes["gen_ai.response.id"] = translator.response_id
        if progress.first_event is not None:
            first_chunk_s = progress.first_event - progress.started
            attributes["gen_ai.response.time_to_first_chunk"] = round(first_chunk_s, 6)
        if finished is not None:
            reason = _FINISH_REASONS.get(finished.reason, "stop")
            attributes["gen_ai.response.finish_reasons"] = [reason]
        span.set_attributes(attributes)
        if cancelled:
            span.set_attribute(tracing.CANCELLED, True)
        if error is not None:
            tracing.record_error(span, error)
        span.end()


def _address(base_url: str) -> dict[str, Any]:
    """`server.address` and `server.port` of a base URL (never its credentials)."""
    if not base_url:
        return {}
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname or "", "server.port": port}
