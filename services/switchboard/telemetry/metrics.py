"""One way to declare a service's Prometheus metrics: `switchboard_<subsystem>_<name>`.

Every service keeps its metrics in a registry of its own (no global state, so
tests build as many as they like) under the namespace `switchboard` and its
own subsystem (`gateway`, `broker`, `session`, `toolexec`). A `MetricFactory`
holds those three and makes each metric from its name, help text and labels:

    metrics = MetricFactory("session")
    rpcs = metrics.counter("rpcs_total", "SessionService calls.", ["method"])
    # exported as switchboard_session_rpcs_total{method=...}

Naming follows Prometheus (docs/metrics.md): `_seconds` histograms, `_total`
counters, bounded label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "switchboard"


class MetricFactory:
    """Makes the metrics of one subsystem in one registry.

    Attributes:
        subsystem: the service's part of every name (`switchboard_<subsystem>_...`).
        registry: where the metrics are registered; serve it at `/metrics`.
    """

    def __init__(self, subsystem: str, registry: CollectorRegistry | None = None) -> None:
        """Args:
        subsystem: the service's name, e.g. `broker`.
        registry: a registry to add to; a fresh one of its own when None.
        """
        self.subsystem = subsystem
        self.registry = registry or CollectorRegistry()
        self._where: dict[str, Any] = {
            "namespace": NAMESPACE,
            "subsystem": subsystem,
            "registry": self.registry,
        }

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter; `name` ends with `_total`."""
        return Counter(name, documentation, labels, **self._where)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge."""
        return Gauge(name, documentation, labels, **self._where)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        """A histogram with these bucket bounds; `name` ends with its unit (`_seconds`)."""
        return Histogram(name, documentation, labels, buckets=buckets, **self._where)
