"""The gateway's Starlette application: routes, authentication, resources.

Routes:
    GET /v1/realtime   WebSocket, the OpenAI Realtime protocol (docs/protocol.md)
    GET /healthz       the process is up
    GET /readyz        every backend answers its health check (503 otherwise)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from switchboard.config import GatewaySettings
from switchboard.errors import AuthenticationFailed, SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.connection import RealtimeConnection
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.tenancy import KeyRing
from switchboard.v1 import session_pb2

log = logging.getLogger(__name__)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def create_app(settings: GatewaySettings) -> Starlette:
    """Build the gateway app. Backends are dialed in the lifespan, closed on shutdown."""
    keyring = KeyRing.parse(settings.tenant_keys)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends = Backends(settings)
        app.state.backends = backends
        try:
            yield
        finally:
            await backends.close()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        checks = await request.app.state.backends.readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def realtime(websocket: WebSocket) -> None:
        backends: Backends = websocket.app.state.backends
        # Resolve the tenant before accept() so a refused socket costs no backend call.
        key = bearer_token(websocket.headers.get("authorization"))
        tenant = keyring.authenticate(key) if key else None
        if tenant is None:
            await _deny(websocket, AuthenticationFailed("Missing or invalid API key."))
            return
        model = websocket.query_params.get("model") or settings.default_model
        config = session_pb2.SessionConfig(model=model, tool_choice="auto")
        try:
            session = await backends.create_session(tenant.id, config)
        except SwitchboardError as error:
            await _deny(websocket, error)
            return
        await websocket.accept()
        protocol = RealtimeProtocol(
            session_id=session.id, config=session.config, max_event_bytes=settings.max_event_bytes
        )
        log.info("connected", extra={"tenant_id": tenant.id, "session_id": session.id})
        connection = RealtimeConnection(
            websocket,
            protocol,
            backends,
            tenant,
            send_queue_events=settings.send_queue_events,
            max_tool_rounds=settings.max_tool_rounds,
        )
        try:
            await connection.run()
        finally:
            log.info("disconnected", extra={"tenant_id": tenant.id, "session_id": session.id})

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            WebSocketRoute("/v1/realtime", realtime),
        ],
        lifespan=lifespan,
    )


async def _deny(websocket: WebSocket, error: SwitchboardError) -> None:
    """Refuse the handshake with the error's HTTP status and an OpenAI-style body."""
    headers = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    if error.spec.http_status == 401:
        headers["www-authenticate"] = "Bearer"
    response = JSONResponse(
        error.to_http_body(), status_code=error.spec.http_status, headers=headers
    )
    await websocket.send_denial_response(response)
