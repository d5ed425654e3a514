"""Summaries of old turns: the context of a long conversation keeps its early facts.

With the tenant's `summaries` enabled, each response's context is built within
the tenant's `context_tokens`. When turns no longer fit and no summary covers
them yet, the session's `Summaries` writes one in the background: the tenant's
summary `model`, through the broker, is given the previous summary and the
turns that no longer fit, and its answer (at most `summary_tokens`) is stored
as an ITEM_TYPE_SUMMARY item right after the last item it covers. The session
service then sends that summary, first, instead of the turns it covers
(session/context.py), so later contexts reuse it, and it is rewritten as more
turns fall out of the budget.

A turn waits for a summary being written at most `wait_s`; past that, or when
the summariser fails, it goes on with the context that drops the old turns,
and `switchboard_gateway_context_summaries_total{result="slow"|"failed"}` says
so. A summary still being written carries on in the background and serves the
next turn. One summary is written at a time per session.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry

from switchboard.errors import SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.ids import Ids
from switchboard.telemetry.metrics import MetricFactory
from switchboard.tenancy import Tenant
from switchboard.v1 import broker_pb2, common_pb2, session_pb2

log = logging.getLogger(__name__)

_C = common_pb2
# The summariser's instructions. The simulator recognises them by their start.
INSTRUCTIONS = (
    "Summarize the conversation so far for your own later use. Keep every fact, "
    "name, number, preference and decision the user may refer to later; drop "
    "pleasantries. Write plain sentences, no preamble."
)


class SummaryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        metrics = MetricFactory("gateway", registry)
        self.summaries = metrics.counter(
            "context_summaries_total",
            "Contexts that needed a summary of old turns, by result: ok (the summary "
            "served the turn), slow (the turn went on without it, dropping old turns, "
            "after waiting wait_s), failed (the summariser failed: old turns dropped).",
            ["result"],
        )
        self.duration = metrics.histogram(
            "context_summary_duration_seconds",
            "Time to write one summary (model call and storing it).",
            [],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class Summaries:
    """The summaries of one session's conversation."""

    def __init__(
        self,
        backends: Backends,
        tenant: Tenant,
        session_id: str,
        metrics: SummaryMetrics,
        ids: Ids,
    ) -> None:
        self.backends = backends
        self.tenant = tenant
        self.session_id = session_id
        self.metrics = metrics
        self.ids = ids
        self._writing: asyncio.Task[None] | None = None

    async def context(self) -> session_pb2.Context:
        """The context of the next response: with the newest summary when the
        tenant summarises, within its budget.

        Raises:
            SwitchboardError: the context could not be built.
        """
        policy, tenant_id = self.tenant.summaries, self.tenant.id
        budget = policy.context_tokens
        if not policy.enabled:
            return await self.backends.build_context(
                tenant_id, self.session_id, max_context_tokens=budget
            )
        context = await self.backends.build_context(
            tenant_id, self.session_id, max_context_tokens=budget, include_unsummarized=True
        )
        if not context.unsummarized:
            return context
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(context))
        writing = self._writing
        done, _ = await asyncio.wait([writing], timeout=policy.wait_s)
        if not done:
            self.metrics.summaries.labels("slow").inc()
            del context.unsummarized[:]
            return context
        if writing.exception() is not None:
            self.metrics.summaries.labels("failed").inc()
            del context.unsummarized[:]
            return context
        self.metrics.summaries.labels("ok").inc()
        return await self.backends.build_context(
            tenant_id, self.session_id, max_context_tokens=budget
        )

    async def _write(self, context: session_pb2.Context) -> None:
        """Summarise the previous summary and the turns no summary covers; store it."""
        started = time.monotonic()
        policy = self.tenant.summaries
        previous = [item for item in context.items[:1] if item.type == _C.ITEM_TYPE_SUMMARY]
        through = context.unsummarized[-1].id
        request = broker_pb2.GenerateRequest(
            tenant_id=self.tenant.id,
            session_id=self.session_id,
            response_id=self.ids.new("resp"),
            model=policy.model,
            context=session_pb2.Context(
                instructions=INSTRUCTIONS, items=[*previous, *context.unsummarized]
            ),
            tool_choice="none",
            max_output_tokens=policy.summary_tokens,
        )
        call = self.backends.generate(request)
        parts: list[str] = []
        try:
            async for event in call:
                if event.WhichOneof("event") == "text_delta":
                    parts.append(event.text_delta.text)
        except SwitchboardError as exc:
            log.warning(
                "summary not written",
                extra={
                    "tenant_id": self.tenant.id,
                    "session_id": self.session_id,
                    "code": exc.name,
                },
            )
            raise
        finally:
            call.cancel()
        text = "".join(parts).strip()
        if not text:
            raise SwitchboardError(
                "The summariser answered nothing.", code=_C.ERROR_CODE_UPSTREAM_ERROR
            )
        item = _C.Item(
            id=self.ids.new("item"),
            type=_C.ITEM_TYPE_SUMMARY,
            role=_C.ROLE_SYSTEM,
            status=_C.ITEM_STATUS_COMPLETED,
            content=[_C.ContentPart(type=_C.CONTENT_TYPE_OUTPUT_TEXT, text=text)],
            summarized_through=through,
        )
        await self.backends.append_item(self.tenant.id, self.session_id, item, through)
        self.metrics.duration.observe(time.monotonic() - started)
