"""The grpc.aio servicer of `switchboard.v1.BrokerService`.

`Generate` streams one model call to the upstream that the calling tenant's
configuration routes the model to (`routing.resolve`, on the `TenantConfig`
snapshot taken when the call starts): `Started` once the upstream accepted the
request, then `TextDelta` / `ToolCallDelta` events as the upstream produces
them, then `Finished` with the usage. A `SwitchboardError` aborts the call with
its gRPC status and the `switchboard-error-code` trailer (`abort_with`);
anything else is logged with the call's ids (never prompt text or keys) and
becomes `internal_error`. Cancelling the call closes the upstream response, and
with it the upstream's TCP connection, so the model stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.routing import resolve
from switchboard.broker.translate import ChunkTranslator, chat_request
from switchboard.broker.upstreams import Upstreams
from switchboard.config import BrokerSettings
from switchboard.errors import InternalError, SwitchboardError, abort_with
from switchboard.tenancy import TenantConfig
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.BrokerService"


@contextlib.asynccontextmanager
async def running(settings: BrokerSettings, tenants: TenantConfig) -> AsyncIterator[BrokerServicer]:
    """A servicer whose upstream clients follow the tenants file while the block runs.

    Watches `tenants` for changes (`TenantConfig.watch`), retires the clients
    of upstreams a reload changed (`Upstreams.reconcile`), and on exit, which
    must come after the gRPC server has drained, closes every client.
    """
    upstreams = Upstreams(settings)
    unsubscribe = tenants.subscribe(upstreams.reconcile)
    watcher = asyncio.create_task(tenants.watch())
    try:
        yield BrokerServicer(tenants, upstreams, settings)
    finally:
        watcher.cancel()
        unsubscribe()
        await upstreams.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService: each call to the upstream its tenant's route names."""

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
        settings: `upstream_model`, when set, replaces every routed upstream model.
        """
        self._tenants = tenants
        self._upstreams = upstreams
        self._settings = settings
        self.metrics = metrics or BrokerMetrics()

    @property
    def upstreams(self) -> Upstreams:
        """The upstream clients calls go through."""
        return self._upstreams

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to a grpc.aio server (the `register` of `rpc.serve`)."""
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(self, server)

    async def Generate(
        self, request: broker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[broker_pb2.GenerateEvent]:
        """Stream one model call: `Started`, the deltas, then `Finished`.

        Errors abort the call (gRPC status plus `switchboard-error-code`);
        nothing is retried once the first event went out.
        """
        ids = {
            "tenant_id": request.tenant_id,
            "session_id": request.session_id,
            "response_id": request.response_id,
        }
        started = time.monotonic()
        translator = ChunkTranslator(
            estimated_input_tokens=request.context.estimated_tokens,
            call_id_prefix=f"call_{request.response_id}_" if request.response_id else "call_",
        )
        call = _CallLog(ids, request.model, started, self.metrics)
        self.metrics.streams_active.inc()
        try:
            target = resolve(
                self._tenants.current,
                request.tenant_id,
                request.model,
                model_override=self._settings.upstream_model,
            )
            call.upstream, call.upstream_model = target.upstream.name, target.model
            payload = chat_request(request, target.model)
            client = self._upstreams.client(target.upstream)
            async with client.stream(payload) as chunks:
                # grpc.aio does not close a generator whose call was cancelled
                # while it waited at a `yield` (the cancellation lands in grpc's
                # own write), so the response would stay open until the generator
                # is garbage-collected. Close it as soon as the call is done.
                context.add_done_callback(lambda _context: chunks.close_soon())
                call.request_id = chunks.request_id
                yield broker_pb2.GenerateEvent(
                    started=broker_pb2.Started(
                        upstream=client.description, upstream_model=target.model
                    )
                )
                async for chunk in chunks:
                    events = translator.feed(chunk)
                    if events and call.first_event is None:
                        call.first_event = time.monotonic()
                    for event in events:
                        yield event
            finished = translator.finish()
        except SwitchboardError as err:
            call.log_failure(err, translator)
            await abort_with(context, err)
            return
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away: CancelledError inside the upstream read, or
            # GeneratorExit when the abandoned generator is closed at a `yield`.
            call.log_cancelled(translator)
            raise
        except Exception:
            log.exception(
                "generate failed",
                extra={**ids, "model": call.model, "upstream": call.upstream},
            )
            await abort_with(context, InternalError("The broker failed."))
            return
        finally:
            self.metrics.streams_active.dec()
        call.log_completed(finished.finished)
        yield finished


class _CallLog:
    """The one log line of a Generate call: ids, model, upstream, timings and usage."""

    def __init__(
        self, ids: dict[str, str], model: str, started: float, metrics: BrokerMetrics
    ) -> None:
        self.ids = ids
        self.metrics = metrics
        self.started = started
        self.model = model
        # Known once the call is routed ("" when it was refused before).
        self.upstream = ""
        self.upstream_model = ""
        self.request_id: str | None = None
        self.first_event: float | None = None

    def _fields(self, usage: common_pb2.Usage) -> dict[str, Any]:
        now = time.monotonic()
        ttft = None if self.first_event is None else round((self.first_event - self.started) * 1000)
        return {
            **self.ids,
            "model": self.model,
            "upstream": self.upstream,
            "upstream_model": self.upstream_model,
            "upstream_request_id": self.request_id,
            "duration_ms": round((now - self.started) * 1000),
            "ttft_ms": ttft,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "usage_estimated": usage.estimated,
        }

    def _observe(self, outcome: str) -> None:
        upstream = self.upstream or "none"
        metrics = self.metrics
        metrics.upstream_requests.labels(upstream, outcome).inc()
        metrics.upstream_duration.labels(upstream, outcome).observe(time.monotonic() - self.started)
        if self.first_event is not None:
            metrics.upstream_time_to_first_token.labels(upstream).observe(
                self.first_event - self.started
            )

    def log_completed(self, finished: broker_pb2.Finished) -> None:
        self._observe("completed")
        fields = self._fields(finished.usage)
        fields["finish_reason"] = broker_pb2.FinishReason.Name(finished.reason)
        log.info("generate completed", extra=fields)

    def log_failure(self, err: SwitchboardError, translator: ChunkTranslator) -> None:
        self._observe("failed")
        self.metrics.upstream_errors.labels(self.upstream or "none", err.name).inc()
        log.warning("generate failed", extra={**self._fields(translator.usage()), "code": err.name})

    def log_cancelled(self, translator: ChunkTranslator) -> None:
        self._observe("cancelled")
        log.info("generate cancelled", extra=self._fields(translator.usage()))
