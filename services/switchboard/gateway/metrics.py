"""The gateway's Prometheus metrics, served at `GET /metrics`.

Names follow the Prometheus conventions under `switchboard_gateway_`: `_seconds`
histograms, `_total` counters. Labels are bounded: model names come from the
tenants' configuration, `reason`/`status`/`code` from fixed sets, and tenants
appear only as their configured tier, never by id.

Time to first token is measured where the user feels it: from `response.create`
received to the first delta handed to the client's socket.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from switchboard.gateway.moderation import ModerationMetrics
from switchboard.gateway.summaries import SummaryMetrics
from switchboard.telemetry.metrics import MetricFactory

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
        metrics = MetricFactory("gateway", registry)
        self.registry = metrics.registry
        # Defined with the moderation they measure (gateway/moderation.py).
        self.moderation = ModerationMetrics(self.registry)
        self.summaries = SummaryMetrics(self.registry)
        self.time_to_first_token = metrics.histogram(
            "time_to_first_token_seconds",
            "From response.create received to the first delta sent to the client.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.voice_time_to_first_audio = metrics.histogram(
            "voice_time_to_first_audio_seconds",
            "Voice sessions: from the end of the user's turn (speech_stopped, a commit "
            "or response.create received) to the response's first audio sent to the client.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.voice_audio_seconds = metrics.counter(
            "voice_audio_seconds_total",
            "Voice sessions: seconds of audio, from clients (input) and to them (output).",
            ["direction"],
        )
        self.voice_interruptions = metrics.counter(
            "voice_interruptions_total",
            "Voice sessions: the user spoke while a response was playing.",
        )
        self.voice_sessions_active = metrics.gauge(
            "voice_sessions_active", "Voice sessions being served (each also a connection)."
        )
        self.inter_token = metrics.histogram(
            "inter_token_seconds",
            "Gap between two consecutive deltas of a response sent to the client.",
            ["model"],
            buckets=_GAP_BUCKETS,
        )
        self.response_duration = metrics.histogram(
            "response_duration_seconds",
            "From response.create received to response.done sent.",
            ["model", "status"],
            buckets=_DURATION_BUCKETS,
        )
        self.responses = metrics.counter(
            "responses_total", "Responses ended, by final status.", ["model", "status"]
        )
        self.tokens = metrics.counter(
            "tokens_total",
            "Tokens of finished responses (usage as reported or estimated).",
            ["model", "direction"],
        )
        self.cost_usd = metrics.counter(
            "cost_usd_total",
            "Cost of finished responses in US dollars, from their usage and the price table.",
            ["tier", "model"],
        )
        self.connections_active = metrics.gauge(
            "connections_active", "Open client WebSocket connections."
        )
        self.sessions_active = metrics.gauge("sessions_active", "Realtime sessions being served.")
        self.event_loop_lag = metrics.gauge(
            "event_loop_lag_seconds",
            "How late the event loop runs its timers, smoothed over a second: above "
            "SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS new work is refused with server_busy.",
        )
        self.sse_streams_active = metrics.gauge(
            "sse_streams_active",
            "Chat Completions and Responses requests being answered (SSE or whole).",
        )
        self.sse_requests = metrics.counter(
            "sse_requests_total",
            "Chat Completions and Responses requests, by API and HTTP status of the answer.",
            ["api", "status"],
        )
        self.connections_opened = metrics.counter(
            "connections_opened_total", "Client connections accepted.", ["tier"]
        )
        self.disconnects = metrics.counter(
            "disconnects_total", "Client connections ended or refused, by reason.", ["reason"]
        )
        self.rejections = metrics.counter(
            "rejections_total",
            "Requests refused by a tenant limit or admission control, by error code.",
            ["code", "tier"],
        )
        self.errors = metrics.counter(
            "errors_total", "error events sent to clients, by code.", ["code"]
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
