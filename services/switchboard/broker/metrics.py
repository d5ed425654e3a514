"""The broker's Prometheus metrics: the upstream side of every model call.

Served on `SWITCHBOARD_BROKER_METRICS_LISTEN` (see `switchboard.rpc.serve`).
`upstream` is the name of an upstream in the tenants file (a bounded set);
`outcome` is completed, failed or cancelled; `code` is an error code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ns, sub, r = "switchboard", "broker", self.registry
        self.upstream_time_to_first_token = Histogram(
            "upstream_time_to_first_token_seconds",
            "From the call reaching the broker to the upstream's first delta.",
            ["upstream"],
            namespace=ns,
            subsystem=sub,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "upstream_request_duration_seconds",
            "Whole upstream calls, by outcome.",
            ["upstream", "outcome"],
            namespace=ns,
            subsystem=sub,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "upstream_requests_total",
            "Upstream calls ended, by outcome.",
            ["upstream", "outcome"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.upstream_errors = Counter(
            "upstream_errors_total",
            "Failed calls, by error code.",
            ["upstream", "code"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.streams_active = Gauge(
            "streams_active",
            "Generate calls in progress.",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
