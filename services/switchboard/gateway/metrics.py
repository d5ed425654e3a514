"""The gateway's Prometheus metrics, served at `GET /metrics`.

Names follow the Prometheus conventions under `switchboard_gateway_`: `_seconds`
histograms, `_total` counters. Labels are bounded: model names come from the
tenants' configuration, `reason`/`status`/`code` from fixed sets, and tenants
appear only as their configured tier, never by id.

Time to first token is measured where the user feels it: from `response.create`
received to the first delta handed to the client's socket.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few milliseconds (a cache) to a slow model's first token.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Why a connection ended (the `reason` label of disconnects).
DISCONNECT_REASONS = (
    "client_closed",
    "slow_consumer",
    "upstream_error",
    "drain",
    "auth",
    "quota",
    "idle",
    "session_expired",
    "taken_over",
    "protocol_error",
    "server_error",
)


class GatewayMetrics:
    """The gateway's metrics in a registry of their own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ns, sub = "switchboard", "gateway"
        r = self.registry
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds",
            "From response.create received to the first delta sent to the client.",
            ["model"],
            namespace=ns,
            subsystem=sub,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "inter_token_seconds",
            "Gap between two consecutive deltas of a response sent to the client.",
            ["model"],
            namespace=ns,
            subsystem=sub,
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.response_duration = Histogram(
            "response_duration_seconds",
            "From response.create received to response.done sent.",
            ["model", "status"],
            namespace=ns,
            subsystem=sub,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "responses_total",
            "Responses ended, by final status.",
            ["model", "status"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.tokens = Counter(
            "tokens_total",
            "Tokens of finished responses (usage as reported or estimated).",
            ["model", "direction"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.connections_active = Gauge(
            "connections_active",
            "Open client WebSocket connections.",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.sessions_active = Gauge(
            "sessions_active",
            "Realtime sessions being served.",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.connections_opened = Counter(
            "connections_opened_total",
            "Client connections accepted.",
            ["tier"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.disconnects = Counter(
            "disconnects_total",
            "Client connections ended or refused, by reason.",
            ["reason"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.rejections = Counter(
            "rejections_total",
            "Requests refused by a tenant limit or admission control, by error code.",
            ["code", "tier"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.errors = Counter(
            "errors_total",
            "error events sent to clients, by code.",
            ["code"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(reason)  # exported at 0 from the start


def refusal_reason(code: str) -> str:
    """The disconnect reason of a handshake refused with error `code`."""
    if code in ("invalid_api_key", "permission_denied", "model_not_allowed", "field_locked"):
        return "auth"
    if code in ("rate_limit_exceeded", "insufficient_quota", "server_busy"):
        return "quota"
    return "server_error"
