"""The gateway's Starlette application: routes, authentication, resources.

Routes:
    GET  /v1/realtime                 WebSocket, the OpenAI Realtime protocol (docs/protocol.md)
    POST /v1/realtime/client_secrets  mint an ephemeral `ek_` secret for a browser
    GET  /healthz                     the process is up
    GET  /readyz                      every backend and Redis answer (503 otherwise,
                                      and while the gateway drains)

`GET /v1/realtime?session_id=...&last_event_id=...` resumes a session (the
resume extension, docs/protocol.md): the events the client missed, then the
live stream, on any gateway replica.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from switchboard.config import GatewaySettings
from switchboard.errors import (
    AuthenticationFailed,
    InvalidRequest,
    SwitchboardError,
    invalid_value,
)
from switchboard.gateway import client_secrets, sessions
from switchboard.gateway.admission import Admission
from switchboard.gateway.backends import Backends
from switchboard.gateway.client_secrets import ClientSecrets, Grant
from switchboard.gateway.connection import RealtimeConnection, Reattach, close_with_error
from switchboard.gateway.eventlog import (
    EventRecorder,
    SessionWriter,
    read_log,
    replay,
    resume_unavailable,
)
from switchboard.gateway.metrics import GatewayMetrics, refusal_reason
from switchboard.gateway.protocol import RealtimeProtocol, event_seq
from switchboard.limits import TenantLimiter
from switchboard.redis_client import any_client, warm_up
from switchboard.tenancy import LiveTenants, Tenant
from switchboard.v1 import common_pb2, session_pb2

# The browser subprotocol that carries a credential (as OpenAI's endpoint takes it).
KEY_SUBPROTOCOL = "openai-insecure-api-key."

log = logging.getLogger(__name__)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def subprotocol_key(subprotocols: list[str]) -> str | None:
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL) :] or None
    return None


def create_app(
    settings: GatewaySettings, tenants: LiveTenants, metrics: GatewayMetrics | None = None
) -> Starlette:
    """Build the gateway app. Backends are dialed in the lifespan, closed on shutdown;
    the tenants file is watched for changes meanwhile."""
    metrics = metrics or GatewayMetrics()
    drainer = Drainer()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends = Backends(settings)
        redis = any_client(settings.redis_url.reveal(), cluster=settings.redis_cluster)
        await warm_up(redis)
        app.state.backends = backends
        app.state.recorder = EventRecorder(backends)
        app.state.redis = redis
        app.state.client_secrets = ClientSecrets(redis)
        app.state.admission = Admission(
            TenantLimiter(redis), reserve_output_tokens=settings.reserve_output_tokens
        )
        watcher = asyncio.create_task(tenants.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await app.state.recorder.close()
            await backends.close()
            await redis.aclose()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        if drainer.draining:
            # Out of the load balancer first, while running responses finish.
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        checks = await request.app.state.backends.readiness()
        try:
            checks["redis"] = bool(await request.app.state.redis.ping())
        except Exception:
            checks["redis"] = False
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def mint_client_secret(request: Request) -> Response:
        key = bearer_token(request.headers.get("authorization"))
        tenant = tenants.current.authenticate(key) if key else None
        if tenant is None:
            return _error_response(AuthenticationFailed("Missing or invalid API key."))
        try:
            body = await _json_object(request)
            ttl_s = client_secrets.parse_ttl(body)
            config = new_session_config(tenant, None)
            session, config = sessions.apply_update(
                sessions.initial_session("", config),
                config,
                body.get("session") or {"type": "realtime"},
            )
            tenant.route(config.model)  # a secret for a model the tenant may not use is refused
            session.pop("id")
            value, expires_at = await request.app.state.client_secrets.mint(
                tenant.id, session, config, ttl_s
            )
        except SwitchboardError as error:
            return _error_response(error)
        log.info("client secret minted", extra={"tenant_id": tenant.id, "ttl_s": ttl_s})
        return JSONResponse({"value": value, "expires_at": expires_at, "session": session})

    async def authenticate(websocket: WebSocket) -> tuple[Tenant, Grant | None]:
        """The tenant (and ephemeral grant) behind a handshake's credential.

        Browsers send an `ek_` secret as a subprotocol; servers send a tenant key
        or an `ek_` secret as a bearer token. A tenant key is never accepted from
        the subprotocol: it would mean a long-lived key sits in a browser.
        """
        from_browser = subprotocol_key(websocket.scope.get("subprotocols") or [])
        key = from_browser or bearer_token(websocket.headers.get("authorization"))
        if key and key.startswith(client_secrets.PREFIX):
            grant = await websocket.app.state.client_secrets.redeem(key)
            tenant = tenants.current.get(grant.tenant_id) if grant else None
            if grant is not None and tenant is not None:
                return tenant, grant
            raise AuthenticationFailed("Invalid or expired client secret.")
        if from_browser:
            raise AuthenticationFailed(
                "Only ephemeral client secrets (ek_...) may be sent as a subprotocol."
            )
        tenant = tenants.current.authenticate(key) if key else None
        if tenant is None:
            raise AuthenticationFailed("Missing or invalid API key.")
        return tenant, None

    def new_session_config(tenant: Tenant, model: str | None) -> session_pb2.SessionConfig:
        """A new session's settings: the tenant's defaults, then the requested model."""
        defaults = tenant.session
        return session_pb2.SessionConfig(
            model=model or defaults.model or settings.default_model,
            instructions=defaults.instructions or "",
            max_output_tokens=defaults.max_output_tokens or 0,
            tool_choice="auto",
        )

    async def realtime(websocket: WebSocket) -> None:
        admission: Admission = websocket.app.state.admission
        # Resolve the tenant before accept() so a refused socket costs no session.
        try:
            if drainer.draining:
                raise SwitchboardError(
                    "This gateway is shutting down; connect again.",
                    code=common_pb2.ERROR_CODE_SERVER_BUSY,
                    retry_after=1.0,
                )
            tenant, grant = await authenticate(websocket)
            requested = websocket.query_params.get("model")
            if grant is None:
                config = new_session_config(tenant, requested)
            else:
                config = grant.config
                if requested and requested != config.model:
                    raise InvalidRequest(
                        f"This client secret is for model '{config.model}'.",
                        code=common_pb2.ERROR_CODE_FIELD_LOCKED,
                        param="model",
                    )
            tenant.route(config.model)
            holder = "conn_" + secrets.token_urlsafe(12)
            await admission.open_connection(tenant, holder)
        except SwitchboardError as error:
            refused(error)
            await _deny(websocket, error)
            return
        try:
            await serve(websocket, tenant, grant, config, holder)
        finally:
            try:
                await admission.close_connection(tenant, holder)
            except SwitchboardError as exc:
                log.warning(
                    "connection slot not released", extra={"tenant_id": tenant.id, "code": exc.name}
                )

    def refused(error: SwitchboardError) -> None:
        reason = refusal_reason(error.name)
        metrics.disconnects.labels(reason).inc()
        if reason == "quota":
            metrics.rejections.labels(error.name, "unknown").inc()

    async def serve(
        websocket: WebSocket,
        tenant: Tenant,
        grant: Grant | None,
        config: session_pb2.SessionConfig,
        holder: str,
    ) -> None:
        backends: Backends = websocket.app.state.backends
        writer = None
        try:
            resume = resume_point(websocket)
            if resume is None:
                session = await backends.create_session(tenant.id, config)
            else:
                session = await backends.get_session(tenant.id, resume.session_id)
                await check_resumable(backends, tenant, session, resume.after_seq)
                if grant is not None and session.config.model != config.model:
                    raise InvalidRequest(
                        f"This client secret is for model '{config.model}'.",
                        code=common_pb2.ERROR_CODE_FIELD_LOCKED,
                        param="model",
                    )
        except SwitchboardError as error:
            refused(error)
            await _deny(websocket, error)
            return
        requested_protocols = websocket.scope.get("subprotocols") or []
        await websocket.accept(
            subprotocol="realtime" if "realtime" in requested_protocols else None
        )
        recorder: EventRecorder = websocket.app.state.recorder
        writer = SessionWriter(
            backends, recorder, tenant.id, session.id, holder, settings.session_lease_s
        )
        if resume is not None:
            try:
                await replay(writer, resume.after_seq, websocket.send_text)
                # The session as its last writer left it (config, last seq, and a
                # response it may have left unfinished when it was killed).
                session = await backends.get_session(tenant.id, session.id)
            except SwitchboardError as error:
                await close_with_error(websocket, error)
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                await writer.release()
                return
        initial = None
        if grant is not None:
            initial = {**sessions.initial_session(session.id, session.config), **grant.session}
            initial["id"] = session.id
        protocol = RealtimeProtocol(
            session_id=session.id,
            config=session.config,
            max_event_bytes=settings.max_event_bytes,
            session=initial,
            locked=grant.locked if grant else frozenset(),
            first_event_seq=session.last_event_seq + 1,
        )
        reattach = None
        if resume is not None and session.open_response_id:
            reattach = await reopen_response(backends, protocol, session)
        log.info(
            "resumed" if resume is not None else "connected",
            extra={"tenant_id": tenant.id, "session_id": session.id},
        )
        connection = RealtimeConnection(
            websocket,
            protocol,
            backends,
            tenant,
            websocket.app.state.admission,
            metrics,
            recorder,
            holder=holder,
            max_buffered_bytes=settings.max_buffered_bytes,
            max_tool_rounds=settings.max_tool_rounds,
            disconnect_grace_s=settings.disconnect_grace_s,
            idle_timeout_s=settings.idle_timeout_s,
            session_lease_s=settings.session_lease_s,
        )
        metrics.connections_opened.labels(tenant.tier).inc()
        metrics.connections_active.inc()
        metrics.sessions_active.inc()
        drainer.add(connection)
        try:
            await connection.run(resumed=resume is not None, reattach=reattach)
        except Exception:
            connection.end_reason = "server_error"
            raise
        finally:
            drainer.discard(connection)
            metrics.connections_active.dec()
            metrics.sessions_active.dec()
            metrics.disconnects.labels(connection.end_reason).inc()
            log.info(
                "disconnected",
                extra={
                    "tenant_id": tenant.id,
                    "session_id": session.id,
                    "reason": connection.end_reason,
                },
            )

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/v1/realtime/client_secrets", mint_client_secret, methods=["POST"]),
            WebSocketRoute("/v1/realtime", realtime),
        ],
        lifespan=lifespan,
    )
    app.state.drainer = drainer
    return app


class Resume(NamedTuple):
    session_id: str
    after_seq: int


def resume_point(websocket: WebSocket) -> Resume | None:
    """The resume extension's query parameters: `session_id` and the
    `last_event_id` the client saw (none: replay the whole log)."""
    session_id = websocket.query_params.get("session_id")
    if session_id is None:
        return None
    last_event_id = websocket.query_params.get("last_event_id") or ""
    after_seq = event_seq(last_event_id) if last_event_id else 0
    if after_seq is None:
        raise invalid_value("last_event_id", "'last_event_id' is not an event id of this session.")
    return Resume(session_id, after_seq)


async def check_resumable(
    backends: Backends, tenant: Tenant, session: session_pb2.Session, after_seq: int
) -> None:
    """Refuse a resume whose missed events are not all in the session's log."""
    page = await backends.read_events(tenant.id, session.id, after_seq, limit=1)
    if after_seq > page.last_seq or after_seq < page.trimmed_seq:
        raise resume_unavailable()


async def reopen_response(
    backends: Backends, protocol: RealtimeProtocol, session: session_pb2.Session
) -> Reattach | None:
    """Take over the response the session's last writer left streaming when it
    died, to finish it by re-attaching to its model call at its broker. When its
    events cannot be read back, end it `failed` with `response_interrupted`."""
    response_id = session.open_response_id
    extra = {"tenant_id": session.tenant_id, "session_id": session.id, "response_id": response_id}
    try:
        if session.open_response_seq <= 0:
            raise ValueError("the response's first event is not known")
        logged = [
            orjson.loads(event.payload)
            async for event in read_log(
                backends, session.tenant_id, session.id, session.open_response_seq - 1
            )
        ]
        command = protocol.reopen(logged)
    except (SwitchboardError, ValueError, orjson.JSONDecodeError) as exc:
        log.warning("response not taken over", extra={**extra, "detail": str(exc)[:200]})
        protocol.interrupted(response_id)
        return None
    log.info("response taken over", extra={**extra, "broker": session.open_response_broker})
    return Reattach(command, session.open_response_broker)


class Drainer:
    """The gateway's live connections, and the drain that ends them on SIGTERM."""

    def __init__(self) -> None:
        self.connections: set[RealtimeConnection] = set()
        self.draining = False
        self._none_left = asyncio.Event()
        self._none_left.set()

    def add(self, connection: RealtimeConnection) -> None:
        self.connections.add(connection)
        self._none_left.clear()
        if self.draining:
            connection.drain()

    def discard(self, connection: RealtimeConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._none_left.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking connections (readiness false), let running responses
        finish for up to `timeout_s`, closing each connection with 1012 when its
        turn ends; then cut the rest (their responses end `cancelled`)."""
        self.draining = True
        log.info("draining", extra={"connections": len(self.connections)})
        for connection in list(self.connections):
            connection.drain()
        try:
            await asyncio.wait_for(self._none_left.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain deadline passed", extra={"connections": len(self.connections)})
            for connection in list(self.connections):
                connection.stop_now()
            await self._none_left.wait()
        log.info("drained")


def _error_response(error: SwitchboardError) -> JSONResponse:
    """The error's HTTP status and an OpenAI-style JSON body."""
    headers = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    if error.spec.http_status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error.to_http_body(), status_code=error.spec.http_status, headers=headers)


async def _deny(websocket: WebSocket, error: SwitchboardError) -> None:
    """Refuse the handshake before it upgrades."""
    await websocket.send_denial_response(_error_response(error))


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "The request body is not valid JSON.", code=common_pb2.ERROR_CODE_INVALID_JSON
        ) from None
    if not isinstance(body, dict):
        raise invalid_value("body", "The request body must be a JSON object.")
    return body
