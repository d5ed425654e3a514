"""The broker's metric names follow the Prometheus conventions, with bounded labels."""

from __future__ import annotations

import re

from switchboard.broker.metrics import BREAKER_STATES, BrokerMetrics

NAME = re.compile(r"switchboard_broker_[a-z][a-z0-9_]*")
GAUGE_SUFFIXES = ("_active", "_requests", "_state")
BOUNDED_LABELS = {"upstream", "outcome", "code", "reason", "state"}


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
    families = list(metrics.registry.collect())
    assert len(families) >= 14
    for family in families:
        assert NAME.fullmatch(family.name), family.name
        if family.type == "counter":
            # prometheus_client strips `_total` from the family name; samples carry it.
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        elif family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        else:
            assert family.name.endswith(GAUGE_SUFFIXES), family.name
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels <= BOUNDED_LABELS, (family.name, labels)
        assert family.documentation, family.name


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
