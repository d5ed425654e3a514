"""The grpc.aio servicer of `switchboard.v1.BrokerService`.

`Generate` runs one model call to the deployments that the calling tenant's
configuration routes the model to (`routing.resolve`, on the `LiveTenants`
snapshot taken when the call starts), through the `dispatch.Dispatcher`:
admission control per upstream, retries and failover before the first token,
circuit breakers. The call runs in a task of its own, held by `calls.Calls`
under its tenant and response id, and the Generate call *follows* it: it
streams `Started` once an attempt is committed, then `TextDelta` /
`ToolCallDelta` events as the upstream produces them, then `Finished` with
the usage. A `SwitchboardError` aborts the call with its gRPC status and the
`switchboard-error-code` trailer (`abort_with`); anything else is logged with
the call's ids (never prompt text or keys) and becomes `internal_error`.

A call outlives its caller: a Generate call cancelled without `Cancel` first
leaves its model call running for the orphan grace, for an `Attach`. `Cancel`
stops a call at once, closing the upstream response, and with it the
upstream's TCP connection, so the model stops generating. `Stream` carries
many Generate and Attach calls, with their ends, over one gRPC stream
(multiplex.py): what the gateway uses. Every Generate, Attach and Stream call
names this broker in its initial metadata (`rpc.BROKER_METADATA_KEY`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from switchboard.broker.admission import Admission, AdmissionLimits
from switchboard.broker.breaker import BreakerDefaults, Breakers
from switchboard.broker.calls import CallCancelled, Calls, Follower, HeldCall
from switchboard.broker.clients import UpstreamClients
from switchboard.broker.dispatch import Dispatcher, Progress
from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.multiplex import CallStream
from switchboard.broker.realtime_session import RealtimeSessions
from switchboard.broker.retry import RetryPolicy
from switchboard.broker.routing import resolve
from switchboard.broker.spans import ChatSpan
from switchboard.broker.translate import ChunkTranslator
from switchboard.config import BrokerSettings
from switchboard.errors import InternalError, SwitchboardError, abort_with
from switchboard.rpc import BROKER_METADATA_KEY
from switchboard.tenancy import LiveTenants
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.BrokerService"


@contextlib.asynccontextmanager
async def running(
    settings: BrokerSettings, tenants: LiveTenants, metrics: BrokerMetrics | None = None
) -> AsyncIterator[BrokerServicer]:
    """A servicer whose upstream clients follow the tenants file while the block runs.

    Watches `tenants` for changes (`LiveTenants.watch`), retires the clients
    of upstreams a reload changed (`UpstreamClients.reconcile`), and on exit, which
    must come after the gRPC server has drained, cancels every call still held
    (orphans included) and then closes every client.
    """
    clients = UpstreamClients(settings)
    unsubscribe = tenants.subscribe(clients.reconcile)
    watcher = asyncio.create_task(tenants.watch())
    servicer = BrokerServicer(tenants, clients, settings, metrics)
    try:
        yield servicer
    finally:
        watcher.cancel()
        unsubscribe()
        await servicer.calls.aclose()
        await servicer.realtime.held.close_all()
        await clients.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def dispatcher(
    settings: BrokerSettings, clients: UpstreamClients, metrics: BrokerMetrics
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
        clients,
        Admission(admission, metrics),
        Breakers(breakers, metrics),
        policy,
        metrics,
    )


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService: each call to the deployments its tenant's route names."""

    def __init__(
        self,
        tenants: LiveTenants,
        clients: UpstreamClients,
        settings: BrokerSettings,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        """Args:
        tenants: the live tenants; `current` is read once per call.
        clients: the upstream clients; the caller owns them and closes them.
        settings: `upstream_model`, when set, replaces every routed upstream
            model; the admission, retry and breaker defaults; the orphan
            grace, the attach limit and the advertised address.
        """
        self._tenants = tenants
        self._settings = settings
        self.metrics = metrics or BrokerMetrics()
        self.dispatcher = dispatcher(settings, clients, self.metrics)
        self.calls = Calls(
            orphan_grace_s=settings.orphan_grace_s,
            attach_max_bytes=settings.attach_max_bytes,
            metrics=self.metrics,
        )
        self._named = ((BROKER_METADATA_KEY, settings.advertise_address),)
        self._streams: set[CallStream] = set()
        self._draining = False
        # Voice sessions (RealtimeService), served next to this one.
        self.realtime = RealtimeSessions(tenants, self.dispatcher.admission, settings, self.metrics)

    @property
    def clients(self) -> UpstreamClients:
        """The upstream clients calls go through."""
        return self.dispatcher.clients

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to a grpc.aio server (the `register` of `rpc.serve`)."""
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(self, server)
        self.realtime.register(server)

    async def Generate(
        self, request: broker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[broker_pb2.GenerateEvent]:
        """Stream one model call: `Started`, the deltas, then `Finished`.

        Errors abort the call (gRPC status plus `switchboard-error-code`);
        nothing is retried once the first delta went out. Cancelled by its
        caller, the model call is orphaned (see `calls`), not stopped.
        """
        await context.send_initial_metadata(self._named)
        follower = self._start(request)
        async with contextlib.aclosing(_follow(follower, context)) as events:
            async for event in events:
                yield event

    async def Attach(
        self, request: broker_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[broker_pb2.GenerateEvent]:
        """Follow a held call: its snapshot, then the live rest, as Generate streams it.

        NOT_FOUND with `response_interrupted` when no attachable call is held
        under the request's tenant and response id.
        """
        await context.send_initial_metadata(self._named)
        follower = self._attach(request)
        if isinstance(follower, SwitchboardError):
            await abort_with(context, follower)
            return
        async with contextlib.aclosing(_follow(follower, context)) as events:
            async for event in events:
                yield event

    async def Stream(
        self,
        requests: AsyncIterator[broker_pb2.StreamRequests],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[broker_pb2.StreamResponse]:
        """Many calls over one stream, as Generate and Attach run them (multiplex.py)."""
        await context.send_initial_metadata(self._named)
        stream = CallStream(self._start, self._attach)
        if self._draining:
            stream.drain()
        self._streams.add(stream)
        # As in `_follow`: the generator may not be closed for a while after
        # its caller is gone; the calls are orphaned at once.
        context.add_done_callback(lambda _context: stream.close())
        reader = asyncio.create_task(_read_requests(requests, stream))
        try:
            async for response in stream.responses():
                yield response
        finally:
            self._streams.discard(stream)
            reader.cancel()
            stream.close()

    def drain(self) -> None:
        """The server drains: every Stream refuses new calls and ends after its own."""
        self._draining = True
        for stream in self._streams:
            stream.drain()
        self.realtime.drain()

    def _start(self, request: broker_pb2.GenerateRequest) -> Follower:
        """Start a model call (see `Generate`); its follower."""
        ids = {
            "tenant_id": request.tenant_id,
            "session_id": request.session_id,
            "response_id": request.response_id,
        }
        return self.calls.start(ids, lambda call: self._pump(request, call))

    def _attach(self, request: broker_pb2.AttachRequest) -> Follower | SwitchboardError:
        """A new follower of a held call (see `Attach`), or why there is none."""
        follower = self.calls.attach(request.tenant_id, request.response_id)
        return _not_held() if follower is None else follower

    async def Cancel(
        self, request: broker_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.CancelResponse:
        """Stop a held call now (its upstream stream closes); whether one was held."""
        cancelled = await self.calls.cancel(request.tenant_id, request.response_id)
        return broker_pb2.CancelResponse(cancelled=cancelled)

    async def _pump(self, request: broker_pb2.GenerateRequest, call: HeldCall) -> None:
        """The model call: each event published to `call`, `Finished` once logged."""
        progress = Progress(started=time.monotonic(), translator=ChunkTranslator())
        line = _CallLog(call.ids, request.model, progress, self.metrics)
        line.span = ChatSpan(request, progress)
        self.metrics.streams_active.inc()
        try:
            target = resolve(
                self._tenants.current,
                request.tenant_id,
                request.model,
                model_override=self._settings.upstream_model,
            )
            # The model span is current in this task (the pump's own) while the call runs.
            # A cancellation while the pump waits for its follower ends the
            # dispatcher's attempt too, releasing its slot and stream.
            with line.span.current(target):
                # Finished, the last event, is published once the call is logged.
                finished = await self.dispatcher.run(request, target, progress, call.publish)
        except SwitchboardError as err:
            line.log_failure(err)
            call.fail(err)
            return
        except asyncio.CancelledError:
            # Cancel, an orphan's grace passed, a replacing Generate, shutdown.
            line.log_cancelled()
            raise
        except Exception:
            log.exception(
                "generate failed",
                extra={**call.ids, "model": line.model, "upstream": progress.upstream},
            )
            call.fail(InternalError("The broker failed."))
            return
        finally:
            self.metrics.streams_active.dec()
        line.log_completed(finished.finished)
        await call.publish(finished)


async def _read_requests(
    requests: AsyncIterator[broker_pb2.StreamRequests], stream: CallStream
) -> None:
    """Hand a Stream's requests to it; when they end (or break), it ends after its calls."""
    try:
        async for batch in requests:
            for request in batch.requests:
                stream.handle(request)
    except (grpc.RpcError, asyncio.CancelledError):
        pass
    finally:
        stream.requests_ended()


async def _follow(
    follower: Follower, context: grpc.aio.ServicerContext
) -> AsyncGenerator[broker_pb2.GenerateEvent, None]:
    """The events of `follower` for a gRPC call, its end as the call's status."""
    # grpc.aio does not close a generator whose call was cancelled while it
    # waited at a `yield` (the cancellation lands in grpc's own write), so
    # the `finally` below may not run for a long time: the done callback
    # orphans the call as soon as the caller is gone.
    context.add_done_callback(lambda _context: follower.detach())
    try:
        async for event in follower:
            yield event
    except CallCancelled as cancelled:
        await context.abort(grpc.StatusCode.CANCELLED, str(cancelled))
    except SwitchboardError as err:
        await abort_with(context, err)
    finally:
        follower.detach()


def _not_held() -> SwitchboardError:
    # The same answer for an unknown id and another tenant's: nothing is revealed.
    return SwitchboardError(
        "The broker holds no such call: it ended, or it runs elsewhere.",
        code=common_pb2.ERROR_CODE_RESPONSE_INTERRUPTED,
    )


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
