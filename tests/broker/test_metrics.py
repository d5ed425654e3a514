"""The broker's metric names follow the Prometheus conventions, with bounded labels."""

from __future__ import annotations

from switchboard.broker.metrics import BREAKER_STATES, BrokerMetrics
from tests.metrics_support import conventional_families


def test_names_types_and_labels_follow_the_conventions() -> None:
    metrics = BrokerMetrics()
    # Labelled families show their samples (and so their labels) once used.
    metrics.upstream_retries.labels("default", "rate_limited").inc()
    metrics.admission_rejections.labels("default", "queue_full").inc()
    metrics.admission_queued.labels("default").set(1)
    metrics.admission_running.labels("default").set(1)
    metrics.set_breaker_state("default", "closed")
    metrics.breaker_transitions.labels("default", "open").inc()
    metrics.orphans.labels("expired").inc()
    metrics.attaches.labels("not_found").inc()
    families = conventional_families(
        metrics.registry,
        service="broker",
        gauge_suffixes=("_active", "_requests", "_state"),
        labels={"upstream", "outcome", "code", "reason", "state"},
    )
    assert len(families) >= 14


def test_the_breaker_state_is_one_hot() -> None:
    metrics = BrokerMetrics()
    metrics.set_breaker_state("east", "open")
    metrics.set_breaker_state("east", "half_open")
    values = {
        s.labels["state"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "switchboard_broker_circuit_breaker_state"
    }
    assert values == {state: float(state == "half_open") for state in BREAKER_STATES}
