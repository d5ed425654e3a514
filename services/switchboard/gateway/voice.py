"""Voice sessions: which sessions are voice, and serving one (docs/voice.md).

A session whose model routes to a `kind: realtime` upstream is relayed to that
upstream through the broker's RealtimeService by a `VoiceConnection`
(voice_connection.py) instead of being served by `RealtimeConnection`.
`VoiceBroker` is the gateway's client of that service, built in the lifespan:
all the gateway's voice sessions at the broker run over one call (voice_mux.py).
A resume of a voice session (`voice_connection` with `after_seq`) attaches to
the session at the broker that holds it before the socket is accepted, so a
refusal is an HTTP status (voice_resume.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
from starlette.websockets import WebSocket

from switchboard.errors import SwitchboardError, from_rpc_error
from switchboard.gateway import voice_resume
from switchboard.gateway.client_secrets import Grant
from switchboard.gateway.voice_connection import VoiceConnection
from switchboard.gateway.voice_outbox import error_event
from switchboard.gateway.voice_resume import VoiceBrokers
from switchboard.tenancy import Tenant, Upstream
from switchboard.v1 import common_pb2, realtime_pb2, session_pb2

if TYPE_CHECKING:
    from switchboard.gateway.resources import Resources

log = logging.getLogger(__name__)

# How long a resume waits for the broker to answer its attach.
ATTACH_TIMEOUT_S = 5.0


class VoiceBroker(VoiceBrokers):
    """The gateway's client of the brokers' RealtimeService, on channels of its own
    (voice's bulk audio does not queue behind the text path's token stream)."""


def is_voice_model(tenant: Tenant, upstreams: Mapping[str, Upstream], model: str) -> bool:
    """Whether `tenant`'s `model` routes to a `kind: realtime` upstream."""
    route = tenant.route(model)
    upstream = upstreams.get(route.upstream)
    return upstream is not None and upstream.kind == "realtime"


async def voice_connection(
    gateway: Resources,
    websocket: WebSocket,
    tenant: Tenant,
    grant: Grant | None,
    session: session_pb2.Session,
    holder: str,
    after_seq: int | None,
) -> VoiceConnection:
    """A voice session's connection, its broker call started: `open` for a new
    session, `attach` (from after `after_seq`) for a resume, before the socket
    is accepted.

    Raises:
        SwitchboardError: voice is not configured; a resume the broker refused
            (`resume_unavailable`, see `_attach`).
    """
    voice = gateway.voice
    if voice is None:
        raise SwitchboardError("Voice sessions are not configured.")
    broker = voice_resume.held_at(session) if after_seq is not None else ""
    connection = VoiceConnection(
        websocket,
        voice.at(broker),
        tenant,
        session,
        grant,
        gateway.gate,
        gateway.metrics,
        gateway.settings,
        holder,
        backends=gateway.backends,
        catalogues=gateway.catalogues,
    )
    if after_seq is None:

        def opened(at: realtime_pb2.RealtimeOpened) -> None:
            note = voice_resume.note_broker(gateway.recorder, tenant.id, session.id, at.broker)
            gateway.backends.spawn(note)

        connection.on_opened = opened
        connection.open()
    else:
        notice = await _attach(connection, tenant, session, after_seq)
        if notice is not None:
            connection.notify(notice)
    return connection


async def serve_voice(
    gateway: Resources, connection: VoiceConnection, subprotocol: str | None, resumed: bool
) -> None:
    """Accept and serve a voice session until it ends, counted like any connection."""
    metrics = gateway.metrics
    try:
        await connection.websocket.accept(subprotocol=subprotocol)
    except BaseException:
        connection.cancel_call()
        raise
    extra = {"tenant_id": connection.tenant.id, "session_id": connection.session_id}
    log.info("resumed" if resumed else "connected", extra={**extra, "voice": True})
    metrics.connections_opened.labels(connection.tenant.tier).inc()
    metrics.connections_active.inc()
    metrics.sessions_active.inc()
    metrics.voice_sessions_active.inc()
    gateway.drainer.add(connection)
    try:
        await connection.run(gateway.drainer.draining)
    except Exception:
        connection.end_reason = "server_error"
        raise
    finally:
        gateway.drainer.discard(connection)
        metrics.connections_active.dec()
        metrics.sessions_active.dec()
        metrics.voice_sessions_active.dec()
        metrics.disconnects.labels(connection.end_reason).inc()
        log.info("disconnected", extra={**extra, "reason": connection.end_reason})


async def _attach(
    connection: VoiceConnection, tenant: Tenant, session: session_pb2.Session, after_seq: int
) -> str | None:
    """Attach `connection` to its session at the broker holding it, from after
    `after_seq`; the notice to send first (audio lost), if any.

    Raises:
        SwitchboardError: `resume_unavailable` (the broker holds no such session,
            or not the events after `after_seq`), what the broker's failure says.
    """
    attach = realtime_pb2.RealtimeAttach(
        tenant_id=tenant.id, session_id=session.id, after_seq=after_seq
    )
    connection.start(realtime_pb2.RealtimeRequest(attach=attach))
    try:
        first = await asyncio.wait_for(connection.first_response(), ATTACH_TIMEOUT_S)
    except (grpc.RpcError, TimeoutError, StopAsyncIteration) as exc:
        connection.cancel_call()
        detail = type(exc).__name__
        if isinstance(exc, grpc.RpcError):
            detail = from_rpc_error(exc, service="broker").name
        log.warning("voice attach failed", extra={"session_id": session.id, "error": detail})
        raise SwitchboardError(
            "The broker that held this voice session does not answer; start a new session.",
            code=common_pb2.ERROR_CODE_RESUME_UNAVAILABLE,
            param="session_id",
        ) from None
    if first.WhichOneof("kind") != "attached":
        connection.cancel_call()
        failure = first.failure
        raise SwitchboardError(failure.message, code=failure.code, param=failure.param or None)
    attached = first.attached
    connection.attached(attached, after_seq)
    if attached.audio_lost:
        return error_event(voice_resume.audio_lost_error())
    return None
