"""The gateway's metric names follow the Prometheus conventions."""

from __future__ import annotations

from switchboard.gateway.metrics import DISCONNECT_REASONS, GatewayMetrics, refusal_reason
from tests.metrics_support import conventional_families


def test_names_types_and_labels_follow_the_conventions() -> None:
    metrics = GatewayMetrics()
    families = conventional_families(
        metrics.registry,
        service="gateway",
        gauge_suffixes=("_seconds", "_bytes", "_total", "_active"),
        labels={"model", "status", "direction", "reason", "code", "tier"},
        histogram_suffixes=("_seconds", "_bytes"),
    )
    assert len(families) >= 10


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
