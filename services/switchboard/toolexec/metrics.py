"""toolexec's Prometheus metrics: tool calls and their durations by tool and outcome.

`tool` is a configured tool name, or `unknown` for a name that exists nowhere
(models invent names, which must not become labels); `outcome` is the
lower-case `ToolOutcome` (ok, invalid_arguments, unknown_tool, not_allowed,
timeout, executor_error). Calls of an MCP server's tools are counted under
`mcp:<server label>`, since the server, not the tenants file, names its tools.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from switchboard.telemetry.metrics import MetricFactory
from switchboard.v1 import toolexec_pb2

_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ToolExecMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        metrics = MetricFactory("toolexec", registry)
        self.registry = metrics.registry
        self.calls = metrics.counter(
            "calls_total",
            "Tool calls answered, by tool and outcome (replays included).",
            ["tool", "outcome"],
        )
        self.duration = metrics.histogram(
            "call_duration_seconds",
            "Time to answer a tool call, by tool and outcome.",
            ["tool", "outcome"],
            buckets=_BUCKETS,
        )

        self.mcp_listings = metrics.counter(
            "mcp_listings_total",
            "MCP servers' tool listings answered, by server label and result (ok, failed); "
            "cached listings included.",
            ["server", "result"],
        )
        self.mcp_listing_duration = metrics.histogram(
            "mcp_listing_duration_seconds",
            "Time to answer a ListMcpTools call, by server label and result.",
            ["server", "result"],
            buckets=_BUCKETS,
        )

    def observe_listing(self, label: str, result: str, started: float) -> None:
        self.mcp_listings.labels(label, result).inc()
        self.mcp_listing_duration.labels(label, result).observe(time.monotonic() - started)

    def observe(self, name: str, response: toolexec_pb2.ExecuteResponse) -> None:
        outcome = toolexec_pb2.ToolOutcome.Name(response.outcome).removeprefix("TOOL_OUTCOME_")
        tool = "unknown" if response.outcome == toolexec_pb2.TOOL_OUTCOME_UNKNOWN_TOOL else name
        self.calls.labels(tool, outcome.lower()).inc()
        self.duration.labels(tool, outcome.lower()).observe(response.duration_ms / 1000)
