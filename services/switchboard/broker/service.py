"""The grpc.aio servicer of `switchboard.v1.BrokerService`.

`Generate` streams one model call to the deployments that the calling
tenant's configuration routes the model to (`routing.resolve`, on the
`TenantConfig` snapshot taken when the call starts), through the
`dispatch.Dispatcher`: admission control per upstream, retries and failover
before the first token, circuit breakers. It yields `Started` once an attempt
is committed, then `TextDelta` / `ToolCallDelta` events as the upstream
produces them, then `Finished` with the usage. A `SwitchboardError` aborts
the call with its gRPC status and the `switchboard-error-code` trailer
(`abort_with`); anything else is logged with the call's ids (never prompt text
or keys) and becomes `internal_error`. Cancelling the call closes the upstream
response, and with it the upstream's TCP connection, so the model stops
generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from switchboard.broker.admission import Admission, AdmissionLimits
from switchboard.broker.breaker import BreakerDefaults, Breakers
from switchboard.broker.dispatch import Dispatcher, Progress
from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.retry import RetryPolicy
from switchboard.broker.routing import resolve
from switchboard.broker.spans import ChatSpan
from switchboard.broker.translate import ChunkTranslator
from switchboard.broker.upstreams import Upstreams
from switchboard.config import BrokerSettings
from switchboard.errors import InternalError, SwitchboardError, abort_with
from switchboard.tenancy import TenantConfig
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.BrokerService"


@contextlib.asynccontextmanager
async def running(
    settings: BrokerSettings, tenants: TenantConfig, metrics: BrokerMetrics | None = None
) -> AsyncIterator[BrokerServicer]:
    """A servicer whose upstream clients follow the tenants file while the block runs.

    Watches `tenants` for changes (`TenantConfig.watch`), retires the clients
    of upstreams a reload changed (`Upstreams.reconcile`), and on exit, which
    must come after the gRPC server has drained, closes every client.
    """
    upstreams = Upstreams(settings)
    unsubscribe = tenants.subscribe(upstreams.reconcile)
    watcher = asyncio.create_task(tenants.watch())
    try:
        yield BrokerServicer(tenants, upstreams, settings, metrics)
    finally:
        watcher.cancel()
        unsubscribe()
        await upstreams.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def dispatcher(
    settings: BrokerSettings, upstreams: Upstreams, metrics: BrokerMetrics
) -> Dispatcher:
    """The dispatcher of a broker with these settings.

    The tenants file may override the admission and breaker settings per upstream.
    """
    admission = AdmissionLimits(
        max_concurrent=settings.max_concurrent,
        max_queued=settings.max_queued,
        max_queued_per_tenant=settings.max_queued_per_tenant,
        queue_timeout_s=settings.queue_timeout_s,
    )
    policy = RetryPolicy(
        attempts=settings.retry_attempts,
        backoff_s=settings.retry_backoff_s,
        backoff_max_s=settings.retry_backoff_max_s,
        deadline_s=settings.retry_deadline_s,
    )
    breakers = BreakerDefaults(settings.breaker_failures, settings.breaker_cooldown_s)
    return Dispatcher(
        upstreams,
        Admission(admission, metrics),
        Breakers(breakers, metrics),
        policy,
        metrics,
    )


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService: each call to the deployments its tenant's route names."""

    def __init__(
        self,
        tenants: TenantConfig,
        upstreams: Upstreams,
        settings: BrokerSettings,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        """Args:
        tenants: the live tenants; `current` is read once per call.
        upstreams: the upstream clients; the caller owns them and closes them.
        settings: `upstream_model`, when set, replaces every routed upstream
            model; the admission, retry and breaker defaults.
        """
        self._tenants = tenants
        self._settings = settings
        self.metrics = metrics or BrokerMetrics()
        self.dispatcher = dispatcher(settings, upstreams, self.metrics)

    @property
    def upstreams(self) -> Upstreams:
        """The upstream clients calls go through."""
        return self.dispatcher.upstreams

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to a grpc.aio server (the `register` of `rpc.serve`)."""
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(self, server)

    async def Generate(
        self, request: broker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[broker_pb2.GenerateEvent]:
        """Stream one model call: `Started`, the deltas, then `Finished`.

        Errors abort the call (gRPC status plus `switchboard-error-code`);
        nothing is retried once the first delta went out.
        """
        ids = {
            "tenant_id": request.tenant_id,
            "session_id": request.session_id,
            "response_id": request.response_id,
        }
        progress = Progress(started=time.monotonic(), translator=ChunkTranslator())
        call = _CallLog(ids, request.model, progress, self.metrics)
        call.span = ChatSpan(request, progress)
        finished: broker_pb2.GenerateEvent | None = None

        def watch(abandon: Callable[[], None]) -> None:
            # grpc.aio does not close a generator whose call was cancelled
            # while it waited at a `yield` (the cancellation lands in grpc's
            # own write), so the upstream response and the admission slot
            # would be held until the generator is garbage-collected. Let go
            # of them as soon as the call is done.
            context.add_done_callback(lambda _context: abandon())

        self.metrics.streams_active.inc()
        try:
            target = resolve(
                self._tenants.current,
                request.tenant_id,
                request.model,
                model_override=self._settings.upstream_model,
            )
            dispatched = self.dispatcher.events(request, target, progress, watch)
            events = call.span.around(dispatched, target)  # the model span, current per step
            # aclosing: a GeneratorExit at our `yield` closes the dispatcher's
            # generator too, releasing its slot and stream at once.
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.WhichOneof("event") == "finished":
                        finished = event  # the last event: sent once the call is logged
                        continue
                    yield event
        except SwitchboardError as err:
            call.log_failure(err)
            await abort_with(context, err)
            return
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away: CancelledError inside the upstream read, or
            # GeneratorExit when the abandoned generator is closed at a `yield`.
            call.log_cancelled()
            raise
        except Exception:
            log.exception(
                "generate failed",
                extra={**ids, "model": call.model, "upstream": progress.upstream},
            )
            await abort_with(context, InternalError("The broker failed."))
            return
        finally:
            self.metrics.streams_active.dec()
        if finished is None:
            # The dispatcher always ends with Finished or an error; never end silently.
            call.log_failure(InternalError("The broker failed."))
            await abort_with(context, InternalError("The broker failed."))
            return
        call.log_completed(finished.finished)
        yield finished


class _CallLog:
    """The one log line of a Generate call: ids, model, upstream, timings and usage."""

    def __init__(
        self, ids: dict[str, str], model: str, progress: Progress, metrics: BrokerMetrics
    ) -> None:
        self.ids = ids
        self.metrics = metrics
        self.model = model
        self.progress = progress
        self.span: ChatSpan | None = None

    def _fields(self, usage: common_pb2.Usage) -> dict[str, Any]:
        progress = self.progress
        now, started, first = time.monotonic(), progress.started, progress.first_event
        return {
            **self.ids,
            "model": self.model,
            # "" when the call was refused before routing.
            "upstream": progress.upstream,
            "upstream_model": progress.upstream_model,
            "upstream_request_id": progress.request_id,
            "attempts": progress.attempts,
            "duration_ms": round((now - started) * 1000),
            "ttft_ms": None if first is None else round((first - started) * 1000),
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "usage_estimated": usage.estimated,
        }

    def _observe(self, outcome: str) -> None:
        progress = self.progress
        upstream = progress.upstream or "none"
        metrics = self.metrics
        metrics.upstream_requests.labels(upstream, outcome).inc()
        metrics.upstream_duration.labels(upstream, outcome).observe(
            time.monotonic() - progress.started
        )
        if progress.first_event is not None:
            metrics.upstream_time_to_first_token.labels(upstream).observe(
                progress.first_event - progress.started
            )

    def log_completed(self, finished: broker_pb2.Finished) -> None:
        self._observe("completed")
        if self.span is not None:
            self.span.end(finished=finished)
        fields = self._fields(finished.usage)
        fields["finish_reason"] = broker_pb2.FinishReason.Name(finished.reason)
        log.info("generate completed", extra=fields)

    def log_failure(self, err: SwitchboardError) -> None:
        self._observe("failed")
        if self.span is not None:
            self.span.end(error=err)
        self.metrics.upstream_errors.labels(self.progress.upstream or "none", err.name).inc()
        fields = self._fields(self.progress.translator.usage())
        log.warning("generate failed", extra={**fields, "code": err.name})

    def log_cancelled(self) -> None:
        self._observe("cancelled")
        if self.span is not None:
            self.span.end(cancelled=True)
        log.info("generate cancelled", extra=self._fields(self.progress.translator.usage()))
