"""The broker's Prometheus metrics: the upstream side of every model call.

Served on `SWITCHBOARD_BROKER_METRICS_LISTEN` (see `switchboard.rpc.serve`).
`upstream` is the name of an upstream in the tenants file (a bounded set);
`outcome` is completed, failed or cancelled for upstream calls, and the
fixed values below for orphans and attaches; `code` is an error code; `reason`
and `state` take the fixed values below. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import CollectorRegistry

from switchboard.telemetry.metrics import MetricFactory

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Why an attempt was repeated, here or on another deployment (docs/broker.md#retries-and-failover).
RETRY_REASONS = (
    "rate_limited",
    "server_error",
    "connection",
    "timeout",
    "stream_broken",
    "server_busy",
)
# Why admission control refused a call with server_busy.
REJECTION_REASONS = ("queue_full", "tenant_queue_full", "queue_timeout")
BREAKER_STATES = ("closed", "open", "half_open")
# What became of a call orphaned by its caller (docs/broker.md#a-call-outlives-its-caller):
# attached to, its grace passed, cancelled by Cancel, replaced by a Generate for
# the same id, past the attach limit, or cancelled at shutdown.
OrphanOutcome = Literal["attached", "expired", "cancelled", "replaced", "too_large", "shutdown"]
ORPHAN_OUTCOMES: tuple[OrphanOutcome, ...] = get_args(OrphanOutcome)
# What an Attach found: an orphan, a followed call (taken over), or no call.
AttachOutcome = Literal["orphan", "taken_over", "not_found"]
ATTACH_OUTCOMES: tuple[AttachOutcome, ...] = get_args(AttachOutcome)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        metrics = MetricFactory("broker", registry)
        self.registry = metrics.registry
        self.upstream_time_to_first_token = metrics.histogram(
            "upstream_time_to_first_token_seconds",
            "From the call reaching the broker to the upstream's first delta.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
        )
        self.upstream_duration = metrics.histogram(
            "upstream_request_duration_seconds",
            "Whole upstream calls, by outcome.",
            ["upstream", "outcome"],
            buckets=_DURATION_BUCKETS,
        )
        self.upstream_requests = metrics.counter(
            "upstream_requests_total", "Upstream calls ended, by outcome.", ["upstream", "outcome"]
        )
        self.upstream_errors = metrics.counter(
            "upstream_errors_total", "Failed calls, by error code.", ["upstream", "code"]
        )
        self.streams_active = metrics.gauge(
            "streams_active", "Model calls in progress, followed by a caller or orphaned."
        )
        self.upstream_retries = metrics.counter(
            "upstream_retries_total",
            "Attempts that failed before the first token and were tried again, here or "
            "on another deployment, by the failing upstream and the reason.",
            ["upstream", "reason"],
        )
        self.admission_rejections = metrics.counter(
            "admission_rejections_total",
            "Calls refused with server_busy by an upstream's admission control.",
            ["upstream", "reason"],
        )
        self.admission_queued = metrics.gauge(
            "admission_queued_requests",
            "Calls waiting for a concurrency slot of the upstream (the queue depth).",
            ["upstream"],
        )
        self.admission_running = metrics.gauge(
            "admission_running_requests",
            "Calls holding a concurrency slot of the upstream.",
            ["upstream"],
        )
        self.breaker_state = metrics.gauge(
            "circuit_breaker_state",
            "1 for the current state of each upstream's circuit breaker, 0 for the others.",
            ["upstream", "state"],
        )
        self.breaker_transitions = metrics.counter(
            "circuit_breaker_transitions_total",
            "Circuit breaker state changes, by the state entered.",
            ["upstream", "state"],
        )

        self.realtime_sessions_active = metrics.gauge(
            "realtime_sessions_active",
            "Voice sessions holding an upstream Realtime WebSocket.",
            ["upstream"],
        )
        self.realtime_sessions = metrics.counter(
            "realtime_sessions_total",
            "Voice sessions ended, by upstream and outcome (closed, hold_expired, "
            "upstream_closed, broker_stopped, cancelled, or the error code).",
            ["upstream", "outcome"],
        )
        self.realtime_held_sessions_active = metrics.gauge(
            "realtime_held_sessions_active",
            "Voice sessions whose caller went away, held for a resume.",
        )
        self.realtime_rollovers = metrics.counter(
            "realtime_rollovers_total",
            "Voice sessions moved to a new upstream session before the upstream's session "
            "limit, by upstream and outcome (completed, failed: the current one was kept).",
            ["upstream", "outcome"],
        )

        self.orphaned_requests = metrics.gauge(
            "orphaned_requests",
            "Calls held without a follower (their caller went away without Cancel), "
            "waiting for an Attach until the orphan grace passes.",
        )
        self.orphans = metrics.counter(
            "orphans_total", "Calls orphaned by their caller, by what became of them.", ["outcome"]
        )
        self.attaches = metrics.counter(
            "attaches_total", "Attach calls, by what they found.", ["outcome"]
        )

        # Every outcome from the start, so that rates exist before the first one.
        for orphan_outcome in ORPHAN_OUTCOMES:
            self.orphans.labels(orphan_outcome)
        for attach_outcome in ATTACH_OUTCOMES:
            self.attaches.labels(attach_outcome)

    def set_breaker_state(self, upstream: str, state: str) -> None:
        """Export `state` as the current one of `upstream`'s breaker."""
        for name in BREAKER_STATES:
            self.breaker_state.labels(upstream, name).set(1 if name == state else 0)
