"""toolexec's metric names follow the Prometheus conventions, with bounded labels."""

from __future__ import annotations

from switchboard.toolexec.metrics import ToolExecMetrics
from switchboard.v1 import toolexec_pb2
from tests.metrics_support import conventional_families

T = toolexec_pb2


def test_names_types_and_labels_follow_the_conventions() -> None:
    metrics = ToolExecMetrics()
    # Labelled families show their samples (and so their labels) once used.
    metrics.observe("calculate", T.ExecuteResponse(outcome=T.TOOL_OUTCOME_OK, duration_ms=3))
    metrics.observe_listing("shop", "ok", 0.0)
    families = conventional_families(
        metrics.registry,
        service="toolexec",
        gauge_suffixes=(),
        labels={"tool", "outcome", "server", "result"},
    )
    assert sorted(family.name for family in families) == [
        "switchboard_toolexec_call_duration_seconds",
        "switchboard_toolexec_calls",
        "switchboard_toolexec_mcp_listing_duration_seconds",
        "switchboard_toolexec_mcp_listings",
    ]


def test_a_made_up_tool_name_is_counted_as_unknown() -> None:
    metrics = ToolExecMetrics()
    metrics.observe("invented_by_the_model", T.ExecuteResponse(outcome=T.TOOL_OUTCOME_UNKNOWN_TOOL))
    labels = {"tool": "unknown", "outcome": "unknown_tool"}
    assert metrics.registry.get_sample_value("switchboard_toolexec_calls_total", labels) == 1
    assert (
        metrics.registry.get_sample_value(
            "switchboard_toolexec_calls_total", {**labels, "tool": "invented_by_the_model"}
        )
        is None
    )
