"""What the gateway's endpoints share, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from switchboard.config import GatewaySettings
from switchboard.gateway.backends import Backends
from switchboard.gateway.client_secrets import ClientSecrets
from switchboard.gateway.drain import Drainer
from switchboard.gateway.eventlog import EventRecorder
from switchboard.gateway.leases import LeaseRenewals
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.overload import LoopLag
from switchboard.gateway.server_tools import ToolCatalogues
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.voice import VoiceBroker
from switchboard.redis_client import AnyRedis
from switchboard.telemetry.logs import RateLimitedLog
from switchboard.tenancy import LiveTenants


@dataclass(frozen=True, slots=True)
class Resources:
    settings: GatewaySettings
    tenants: LiveTenants
    metrics: GatewayMetrics
    drainer: Drainer
    backends: Backends
    recorder: EventRecorder
    # The session writer leases of all connections, renewed together.
    leases: LeaseRenewals
    # The tenants' toolexec tool catalogues, shared by all sessions.
    catalogues: ToolCatalogues
    redis: AnyRedis
    client_secrets: ClientSecrets
    gate: TenantGate
    # Refused handshakes and requests: expected, client-caused, rate-limited.
    refusals: RateLimitedLog
    # The broker's RealtimeService, for voice sessions (voice.py).
    voice: VoiceBroker | None = None
    # The event loop's lag; new work is refused while it is over the limit.
    overload: LoopLag = field(default_factory=lambda: LoopLag(0.0))
