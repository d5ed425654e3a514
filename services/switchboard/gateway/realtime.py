"""The `GET /v1/realtime` WebSocket endpoint: the handshake, then a connection.

Everything that can refuse a client is checked before the socket is accepted,
so a refusal is an HTTP status with an OpenAI-style body and costs no session:
the drain, the credential, the model, the tenant's connection limit, and for
a resume (`?session_id=...&last_event_id=...`, docs/protocol.md) the session
and whether its log still holds what the client missed. After the accept, a
resume replays the missed events and takes up a response a dead gateway left
open; then `RealtimeConnection` serves the client.
"""

from __future__ import annotations

import logging
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from switchboard.errors import SwitchboardError
from switchboard.gateway import handshake, sessions, voice, voice_resume
from switchboard.gateway.client_secrets import Grant
from switchboard.gateway.connection import RealtimeConnection
from switchboard.gateway.eventlog import SessionWriter
from switchboard.gateway.metrics import refusal_reason
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.resources import Resources
from switchboard.gateway.resume import (
    Resume,
    check_resumable,
    reopen_response,
    replay,
    resume_point,
)
from switchboard.gateway.sender import close_with_error
from switchboard.tenancy import Tenant
from switchboard.v1 import session_pb2

log = logging.getLogger(__name__)


async def realtime(websocket: WebSocket) -> None:
    gateway: Resources = websocket.app.state.gateway
    # Resolve the tenant before accept() so a refused socket costs no session.
    try:
        gateway.drainer.check_open()
        gateway.overload.check()
        tenant, grant = await handshake.authenticate(
            websocket, gateway.tenants.current, gateway.client_secrets
        )
        config = handshake.session_config(
            gateway.settings, tenant, grant, websocket.query_params.get("model")
        )
        holder = "conn_" + secrets.token_urlsafe(12)
        await gateway.gate.open_connection(tenant, holder)
    except SwitchboardError as error:
        await _refuse(gateway, websocket, error)
        return
    try:
        await _serve(gateway, websocket, tenant, grant, config, holder)
    finally:
        try:
            await gateway.gate.close_connection(tenant, holder)
        except SwitchboardError as exc:
            log.warning(
                "connection slot not released", extra={"tenant_id": tenant.id, "code": exc.name}
            )


def _shed(gateway: Resources, tenant: Tenant) -> None:
    """Refuse a new response while the gateway is overloaded (gateway/overload.py),
    counting the refusal."""
    try:
        gateway.overload.check("send response.create")
    except SwitchboardError:
        gateway.metrics.rejections.labels("server_busy", tenant.tier).inc()
        raise


async def _refuse(gateway: Resources, websocket: WebSocket, error: SwitchboardError) -> None:
    reason = refusal_reason(error.name)
    gateway.refusals.info("handshake refused", code=error.name)
    gateway.metrics.disconnects.labels(reason).inc()
    if reason == "quota":
        gateway.metrics.rejections.labels(error.name, "unknown").inc()
    await handshake.deny(websocket, error)


async def _open_session(
    gateway: Resources,
    websocket: WebSocket,
    tenant: Tenant,
    grant: Grant | None,
    config: session_pb2.SessionConfig,
) -> tuple[session_pb2.Session, Resume | None]:
    """A new session, or the one the client resumes, with where it resumes (None
    for a new session). A voice session's events are numbered by the broker that
    holds it, which checks the resume point when it is attached to."""
    backends = gateway.backends
    query = dict(websocket.query_params)
    if query.get("session_id") is None:
        return await backends.create_session(tenant.id, config), None
    session = await backends.get_session(tenant.id, query["session_id"])
    if _is_voice(gateway, tenant, session):
        last_event_id = query.get("last_event_id") or ""
        resume: Resume | None = Resume(session.id, voice_resume.after_seq(last_event_id))
    else:
        resume = resume_point(query) or Resume(session.id, 0)
        await check_resumable(backends, tenant.id, session, resume)
    if grant is not None:
        handshake.check_grant_model(grant, session.config.model)
    return session, resume


def _is_voice(gateway: Resources, tenant: Tenant, session: session_pb2.Session) -> bool:
    return voice.is_voice_model(tenant, gateway.tenants.current.upstreams, session.config.model)


async def _serve(
    gateway: Resources,
    websocket: WebSocket,
    tenant: Tenant,
    grant: Grant | None,
    config: session_pb2.SessionConfig,
    holder: str,
) -> None:
    backends, settings, metrics = gateway.backends, gateway.settings, gateway.metrics
    try:
        session, resume = await _open_session(gateway, websocket, tenant, grant, config)
    except SwitchboardError as error:
        await _refuse(gateway, websocket, error)
        return
    requested_protocols = websocket.scope.get("subprotocols") or []
    subprotocol = "realtime" if "realtime" in requested_protocols else None
    if _is_voice(gateway, tenant, session):
        # A voice model's session is relayed to its Realtime upstream (voice.py).
        after_seq = resume.after_seq if resume is not None else None
        try:
            relay = await voice.voice_connection(
                gateway, websocket, tenant, grant, session, holder, after_seq
            )
        except SwitchboardError as error:
            await _refuse(gateway, websocket, error)
            return
        await voice.serve_voice(gateway, relay, subprotocol, resumed=after_seq is not None)
        return
    await websocket.accept(subprotocol=subprotocol)
    resumed = resume is not None
    ahead = None
    if resume is not None:
        writer = SessionWriter(
            backends, gateway.recorder, tenant.id, session.id, holder, settings.session_lease_s
        )
        try:
            await replay(writer, resume.after_seq, websocket.send_text)
            # The session as its last writer left it (config, last seq, and a
            # response it may have left unfinished when it was killed).
            session = await backends.get_session(tenant.id, session.id)
            ahead = resume.ahead_of(session)
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
        # After the client's last event too: deltas it had may be missing from
        # the log (the gap is recorded under its last delta's id).
        first_event_seq=max(session.last_event_seq, resume.after_seq if resume else 0) + 1,
        mcp_servers=tenant.mcp_servers,
        admit_response=lambda: _shed(gateway, tenant),
    )
    protocol.open(resumed=resumed)
    reattach = None
    if resumed and session.open_response_id:
        reattach = await reopen_response(backends, protocol, session, ahead)
    extra = {"tenant_id": tenant.id, "session_id": session.id}
    log.info("resumed" if resumed else "connected", extra=extra)
    connection = RealtimeConnection(
        websocket,
        protocol,
        backends,
        tenant,
        gateway.gate,
        metrics,
        gateway.recorder,
        gateway.leases,
        settings,
        holder=holder,
        catalogues=gateway.catalogues,
    )
    metrics.connections_opened.labels(tenant.tier).inc()
    metrics.connections_active.inc()
    metrics.sessions_active.inc()
    gateway.drainer.add(connection)
    try:
        await connection.run(reattach=reattach)
    except Exception:
        connection.end_reason = "server_error"
        raise
    finally:
        gateway.drainer.discard(connection)
        metrics.connections_active.dec()
        metrics.sessions_active.dec()
        metrics.disconnects.labels(connection.end_reason).inc()
        log.info("disconnected", extra={**extra, "reason": connection.end_reason})
