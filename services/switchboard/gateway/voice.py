"""Voice sessions: which sessions are voice, and serving one (docs/voice.md).

A session whose model routes to a `kind: realtime` upstream is relayed to that
upstream through the broker's RealtimeService by a `VoiceConnection`
(voice_connection.py) instead of being served by `RealtimeConnection`.
`VoiceBroker` is the gateway's client of that service, built in the lifespan:
all the gateway's voice sessions at the broker run over one call (voice_mux.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from switchboard import rpc
from switchboard.errors import SwitchboardError
from switchboard.gateway.client_secrets import Grant
from switchboard.gateway.sender import close_with_error
from switchboard.gateway.voice_connection import VoiceConnection
from switchboard.gateway.voice_mux import VoiceMux
from switchboard.tenancy import Tenant, Upstream
from switchboard.v1 import realtime_pb2_grpc, session_pb2

if TYPE_CHECKING:
    from switchboard.gateway.resources import Resources

log = logging.getLogger(__name__)

VOICE_NOT_RESUMABLE = "Voice sessions cannot be resumed; open a new session."


class VoiceBroker:
    """The gateway's client of the broker's RealtimeService, on a channel of its own
    (voice's bulk audio does not queue behind the text path's token stream)."""

    def __init__(self, target: str) -> None:
        self.channel = rpc.channel(target)
        self.stub = realtime_pb2_grpc.RealtimeServiceStub(self.channel)
        self.sessions = VoiceMux(self.stub, target)

    async def close(self) -> None:
        await self.sessions.close()
        await self.channel.close()


def is_voice_model(tenant: Tenant, upstreams: Mapping[str, Upstream], model: str) -> bool:
    """Whether `tenant`'s `model` routes to a `kind: realtime` upstream."""
    route = tenant.route(model)
    upstream = upstreams.get(route.upstream)
    return upstream is not None and upstream.kind == "realtime"


async def serve_voice(
    gateway: Resources,
    websocket: WebSocket,
    tenant: Tenant,
    grant: Grant | None,
    session: session_pb2.Session,
    holder: str,
) -> None:
    """Serve an accepted voice session until it ends, counted like any connection."""
    metrics = gateway.metrics
    if gateway.voice is None:
        await close_with_error(websocket, SwitchboardError("Voice sessions are not configured."))
        return
    connection = VoiceConnection(
        websocket,
        gateway.voice.sessions,
        tenant,
        session,
        grant,
        gateway.gate,
        metrics,
        gateway.settings,
        holder,
        backends=gateway.backends,
    )
    extra = {"tenant_id": tenant.id, "session_id": session.id}
    log.info("connected", extra={**extra, "voice": True})
    metrics.connections_opened.labels(tenant.tier).inc()
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
