"""The gateway's metric names follow the Prometheus conventions."""

from __future__ import annotations

import re

from switchboard.gateway.metrics import DISCONNECT_REASONS, GatewayMetrics, refusal_reason

NAME = re.compile(r"switchboard_gateway_[a-z][a-z0-9_]*")
UNIT_SUFFIXES = ("_seconds", "_bytes", "_total", "_active")
BOUNDED_LABELS = {"model", "status", "direction", "reason", "code", "tier"}


def test_names_types_and_labels_follow_the_conventions() -> None:
    metrics = GatewayMetrics()
    families = list(metrics.registry.collect())
    assert len(families) >= 10
    for family in families:
        assert NAME.fullmatch(family.name), family.name
        if family.type == "counter":
            # prometheus_client strips `_total` from the family name; samples carry it.
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        elif family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes")), family.name
        else:
            assert family.name.endswith(UNIT_SUFFIXES), family.name
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels <= BOUNDED_LABELS, (family.name, labels)
        assert family.documentation, family.name


def test_every_disconnect_reason_is_exported_from_the_start() -> None:
    text = "\n".join(
        f"{s.name}{s.labels}"
        for family in GatewayMetrics().registry.collect()
        for s in family.samples
        if s.name == "switchboard_gateway_disconnects_total"
    )
    for reason in DISCONNECT_REASONS:
        assert f"'reason': '{reason}'" in text


def test_refusal_reasons() -> None:
    assert refusal_reason("invalid_api_key") == "auth"
    assert refusal_reason("insufficient_quota") == "quota"
    assert refusal_reason("service_unavailable") == "server_error"
