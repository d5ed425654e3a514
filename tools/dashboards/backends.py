"""Panels of toolexec, the session service and the scrape targets themselves."""

from __future__ import annotations

from tools.dashboards.panels import (
    COUNT,
    JSON,
    PER_SECOND,
    SECONDS,
    TOOL,
    Query,
    quantiles,
    rate,
    stat,
    timeseries,
)

SERVICES = 'job=~".*switchboard.*"'

TOOL_DURATION = "switchboard_toolexec_call_duration_seconds"


def tool_latency(width: int = 8, qs: tuple[float, ...] = (0.95,)) -> JSON:
    return timeseries(
        "Tool latency by tool",
        "Time toolexec took to answer a call, by tool.",
        SECONDS,
        *quantiles(TOOL_DURATION, TOOL, "tool", qs),
        width=width,
    )


def tool_calls(width: int = 8) -> JSON:
    return timeseries(
        "Tool calls by outcome",
        "Tool calls answered per second: ok, invalid_arguments, unknown_tool, "
        "not_allowed, timeout, executor_error.",
        PER_SECOND,
        Query(rate("switchboard_toolexec_calls_total", TOOL, "outcome"), "{{outcome}}"),
        width=width,
        stacked=True,
    )


SESSION_RPCS = "switchboard_session_rpcs_total"


def session_latency(width: int = 12) -> JSON:
    return timeseries(
        "Session calls p99 by method",
        "Time the session service took to answer, by method.",
        SECONDS,
        *quantiles("switchboard_session_rpc_duration_seconds", "", "method", (0.99,)),
        width=width,
    )


def redis_errors(width: int = 12) -> JSON:
    return timeseries(
        "Session store: Redis errors",
        "Session calls failed by Redis per second, by redis-py error.",
        PER_SECOND,
        Query(rate("switchboard_session_redis_errors_total", by="error"), "{{error}}"),
        width=width,
        stacked=True,
    )


def targets_up(width: int = 12) -> JSON:
    return timeseries(
        "Services up",
        "1 while Prometheus can scrape the instance (`up`); 0 when it is down.",
        COUNT,
        Query(f"up{{{SERVICES}}}", "{{job}} {{instance}}"),
        width=width,
        max_value=1,
    )


def redis_up() -> JSON:
    return stat(
        "Redis answering",
        "Lowest switchboard_session_redis_up across session replicas: 1 while Redis "
        "answers the readiness probe.",
        COUNT,
        Query("min(switchboard_session_redis_up)", "redis up"),
        width=8,
        height=8,
        red_below=1,
    )
