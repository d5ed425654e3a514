"""The session service's Prometheus metrics: every RPC and the Redis behind it.

Served on `SWITCHBOARD_SESSION_METRICS_LISTEN` (see `switchboard.rpc.serve`).
`method` is a SessionService method name (a fixed set); `outcome` is `ok` or
the error code the call was answered with (`session_not_found`,
`session_store_unavailable`, `internal_error`, ...); `error` is the redis-py
exception class behind a failed call (`ConnectionError`, `TimeoutError`, ...),
a small fixed set of the library's own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from switchboard.telemetry.metrics import MetricFactory

# Seconds: a Redis round trip is sub-millisecond; a timeout is one second.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class SessionMetrics:
    """The session service's metrics in a registry of their own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        metrics = MetricFactory("session", registry)
        self.registry = metrics.registry
        self.rpcs = metrics.counter(
            "rpcs_total",
            "SessionService calls answered, by method and outcome.",
            ["method", "outcome"],
        )
        self.rpc_duration = metrics.histogram(
            "rpc_duration_seconds",
            "Time to answer a SessionService call, by method and outcome.",
            ["method", "outcome"],
            buckets=_BUCKETS,
        )
        self.redis_errors = metrics.counter(
            "redis_errors_total",
            "Calls failed by Redis (down, timing out, read-only, ...), by redis-py error.",
            ["error"],
        )
        self.redis_up = metrics.gauge(
            "redis_up", "1 while Redis answers the readiness probe, 0 while it does not."
        )
        # The children of (method, outcome), looked up once: `labels()` takes a
        # lock and builds a key on every call, on every RPC.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        children = self._children.get((method, outcome))
        if children is None:
            children = self.rpcs.labels(method, outcome), self.rpc_duration.labels(method, outcome)
            self._children[(method, outcome)] = children
        count, duration = children
        count.inc()
        duration.observe(seconds)
