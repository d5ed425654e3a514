"""The gateway's Starlette application: its routes and its lifespan.

Routes:
    GET  /v1/realtime                 WebSocket, the OpenAI Realtime protocol
                                      (realtime.py, docs/protocol.md); resumes a
                                      session with `?session_id=...&last_event_id=...`
    POST /v1/realtime/client_secrets  mint an ephemeral `ek_` secret for a browser
    POST /v1/chat/completions         OpenAI Chat Completions, streamed over SSE or
                                      whole (openai_http.py, sse.py)
    POST /v1/responses                OpenAI Responses, streamed (semantic events) or whole
    GET  /v1/usage                    the calling tenant's requests, tokens and cost by day
    GET  /healthz                     the process is up
    GET  /readyz                      every backend and Redis answer (503 otherwise,
                                      and while the gateway drains)
    GET  /metrics                     Prometheus metrics

The lifespan dials the backends and Redis, shares them with the endpoints as
`app.state.gateway` (`Resources`), watches the tenants file meanwhile, and
closes everything on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from switchboard.config import GatewaySettings
from switchboard.errors import SwitchboardError
from switchboard.gateway import client_secrets, handshake, sessions
from switchboard.gateway.backends import Backends, GrpcBackends
from switchboard.gateway.client_secrets import ClientSecrets
from switchboard.gateway.drain import Drainer
from switchboard.gateway.eventlog import EventRecorder
from switchboard.gateway.leases import LeaseRenewals
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.openai_http import chat_completions_endpoint, responses_endpoint
from switchboard.gateway.overload import LoopLag
from switchboard.gateway.realtime import realtime
from switchboard.gateway.resources import Resources
from switchboard.gateway.server_tools import ToolCatalogues
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.usage_api import usage_endpoint
from switchboard.gateway.voice import VoiceBroker
from switchboard.limits import TenantLimiter
from switchboard.limits.ledger import UsageLedger
from switchboard.redis_client import any_client, warm_up
from switchboard.telemetry.logs import RateLimitedLog
from switchboard.tenancy import LiveTenants

log = logging.getLogger(__name__)


def create_app(
    settings: GatewaySettings,
    tenants: LiveTenants,
    metrics: GatewayMetrics | None = None,
    *,
    backends: Backends | None = None,
) -> Starlette:
    """Build the gateway app.

    Args:
        backends: the backends to use (in-process tests pass
            `switchboard.gateway.testing.MemoryBackends`); by default gRPC
            clients of the configured targets, dialed in the lifespan.
    """
    metrics = metrics or GatewayMetrics()
    drainer = Drainer()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        used = backends or GrpcBackends(settings)
        redis = any_client(settings.redis_url.reveal(), cluster=settings.redis_cluster)
        await warm_up(redis)
        recorder = EventRecorder(used)
        leases = LeaseRenewals(used, settings.session_lease_s)
        app.state.gateway = Resources(
            settings=settings,
            tenants=tenants,
            metrics=metrics,
            drainer=drainer,
            backends=used,
            recorder=recorder,
            leases=leases,
            catalogues=ToolCatalogues(used),
            redis=redis,
            client_secrets=ClientSecrets(redis),
            gate=TenantGate(
                TenantLimiter(redis),
                reserve_output_tokens=settings.reserve_output_tokens,
                ledger=UsageLedger(redis),
                prices=lambda: tenants.current.prices,
            ),
            refusals=RateLimitedLog(log),
            voice=VoiceBroker(settings.broker_target),
            overload=LoopLag(settings.shed_loop_lag_s, metrics.event_loop_lag),
        )
        app.state.gateway.overload.start()
        watcher = asyncio.create_task(tenants.watch())
        try:
            yield
        finally:
            watcher.cancel()
            app.state.gateway.overload.stop()
            await recorder.close()
            await leases.close()
            await used.close()
            if app.state.gateway.voice is not None:
                await app.state.gateway.voice.close()
            await redis.aclose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/v1/realtime/client_secrets", mint_client_secret, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions_endpoint, methods=["POST"]),
            Route("/v1/responses", responses_endpoint, methods=["POST"]),
            Route("/v1/usage", usage_endpoint),
            WebSocketRoute("/v1/realtime", realtime),
        ],
        lifespan=lifespan,
    )
    app.state.drainer = drainer
    app.state.metrics = metrics
    return app


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def readyz(request: Request) -> Response:
    gateway: Resources = request.app.state.gateway
    if gateway.drainer.draining:
        # Out of the load balancer first, while running responses finish.
        return JSONResponse({"ready": False, "draining": True}, status_code=503)
    checks = await gateway.backends.readiness()
    try:
        checks["redis"] = bool(await gateway.redis.ping())
    except Exception:
        checks["redis"] = False
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def mint_client_secret(request: Request) -> Response:
    """`POST /v1/realtime/client_secrets`: an `ek_` secret for the session the
    body describes, validated as a `session.update` would be."""
    gateway: Resources = request.app.state.gateway
    try:
        tenant = handshake.tenant_of_key(gateway.tenants.current, request.headers)
        body = await handshake.json_object(request)
        ttl_s = client_secrets.parse_ttl(body)
        config = handshake.new_session_config(gateway.settings, tenant, None)
        session, config = sessions.apply_update(
            sessions.initial_session("", config),
            config,
            body.get("session") or {"type": "realtime"},
            mcp_servers=tenant.mcp_servers,
        )
        tenant.route(config.model)  # a secret for a model the tenant may not use is refused
        session.pop("id")
        value, expires_at = await gateway.client_secrets.mint(tenant.id, session, config, ttl_s)
    except SwitchboardError as error:
        gateway.refusals.info("request refused", code=error.name, path=request.url.path)
        return handshake.error_response(error)
    log.info("client secret minted", extra={"tenant_id": tenant.id, "ttl_s": ttl_s})
    return JSONResponse({"value": value, "expires_at": expires_at, "session": session})
