"""Switchboard's Grafana dashboards: an overview and one per service.

Every query reads metrics documented in docs/metrics.md.
"""

from __future__ import annotations

import json

from tools.dashboards.backends import (
    SESSION_RPCS,
    redis_errors,
    redis_up,
    session_latency,
    targets_up,
    tool_calls,
    tool_latency,
)
from tools.dashboards.broker import (
    UPSTREAM_REQUESTS,
    admission_rejections,
    breaker_open,
    queue_depth,
    retries,
    upstream_error_ratio,
    upstream_errors,
    upstream_latency,
    upstream_requests,
)
from tools.dashboards.gateway import (
    active_connections,
    connections_opened,
    cost_by_tier_and_model,
    cost_in_range,
    disconnects,
    error_rate,
    errors_by_code,
    event_loop_lag,
    inter_token,
    rate_limit_rejections,
    response_duration,
    responses_by_status,
    tokens_per_second,
    ttft_client_vs_upstream,
    ttft_quantiles,
    ttft_slo,
)
from tools.dashboards.panels import (
    JSON,
    P50_95_99,
    PER_SECOND,
    TOOL,
    Query,
    dashboard,
    label_variable,
    rate,
    timeseries,
)


def overview() -> JSON:
    return dashboard(
        "switchboard-overview",
        "Switchboard / Overview",
        "Time to first token and disconnects as clients see them, traffic, limits, "
        "upstreams, queues and tools.",
        [
            (
                "Time to first token",
                [ttft_quantiles(), ttft_slo(), ttft_client_vs_upstream()],
            ),
            ("Connections", [active_connections(), disconnects(), connections_opened()]),
            ("Traffic and errors", [tokens_per_second(), responses_by_status(), error_rate()]),
            ("Limits and admission", [rate_limit_rejections(), admission_rejections()]),
            ("Cost", [cost_by_tier_and_model(), cost_in_range()]),
            ("Upstreams", [upstream_latency(), upstream_errors(), retries()]),
            ("Queues and tools", [queue_depth(), tool_latency(), tool_calls()]),
            ("Services", [targets_up(), redis_errors()]),
        ],
        [
            label_variable("model", "Model", "switchboard_gateway_responses_total"),
            label_variable("upstream", "Upstream", UPSTREAM_REQUESTS),
            label_variable("tool", "Tool", "switchboard_toolexec_calls_total"),
        ],
    )


def gateway() -> JSON:
    return dashboard(
        "switchboard-gateway",
        "Switchboard / Gateway",
        "The edge: latency as clients see it, connections, responses, limits and errors.",
        [
            ("Latency", [ttft_quantiles(), inter_token(), response_duration(), ttft_slo()]),
            (
                "Connections",
                [active_connections(), disconnects(), connections_opened()],
            ),
            ("Responses", [responses_by_status(), tokens_per_second(), error_rate()]),
            (
                "Refusals and errors",
                [rate_limit_rejections(width=8), errors_by_code(width=8), event_loop_lag()],
            ),
            ("Cost", [cost_by_tier_and_model(), cost_in_range()]),
        ],
        [label_variable("model", "Model", "switchboard_gateway_responses_total")],
    )


def broker() -> JSON:
    return dashboard(
        "switchboard-broker",
        "Switchboard / Broker",
        "Upstream calls: latency, outcomes, errors, retries, admission control and "
        "circuit breakers.",
        [
            (
                "Upstream calls",
                [upstream_latency(), upstream_requests(), upstream_error_ratio()],
            ),
            ("Failures", [upstream_errors(), retries(), breaker_open()]),
            ("Admission control", [queue_depth(width=12), admission_rejections()]),
        ],
        [label_variable("upstream", "Upstream", UPSTREAM_REQUESTS)],
    )


def session() -> JSON:
    return dashboard(
        "switchboard-session",
        "Switchboard / Session",
        "The session service: calls by method and outcome, latency, and its Redis.",
        [
            (
                "Calls",
                [
                    timeseries(
                        "Session calls by method",
                        "SessionService calls answered per second, by method.",
                        PER_SECOND,
                        Query(rate(SESSION_RPCS, by="method"), "{{method}}"),
                        stacked=True,
                    ),
                    timeseries(
                        "Session call failures by outcome",
                        "Calls answered with an error per second, by method and error code.",
                        PER_SECOND,
                        Query(
                            rate(SESSION_RPCS, 'outcome!="ok"', "method, outcome"),
                            "{{method}}: {{outcome}}",
                        ),
                        stacked=True,
                    ),
                ],
            ),
            ("Latency and Redis", [session_latency(width=8), redis_errors(width=8), redis_up()]),
        ],
        [],
    )


def toolexec() -> JSON:
    return dashboard(
        "switchboard-toolexec",
        "Switchboard / Tools",
        "Server-side tool calls: outcomes and latency by tool.",
        [
            ("Calls", [tool_calls(width=12), tool_latency(width=12, qs=P50_95_99)]),
            (
                "Failures",
                [
                    timeseries(
                        "Tool failures by tool and outcome",
                        "Calls that did not end ok, per second.",
                        PER_SECOND,
                        Query(
                            rate(
                                "switchboard_toolexec_calls_total",
                                f'outcome!="ok",{TOOL}',
                                "tool, outcome",
                            ),
                            "{{tool}}: {{outcome}}",
                        ),
                        width=24,
                        stacked=True,
                    )
                ],
            ),
        ],
        [label_variable("tool", "Tool", "switchboard_toolexec_calls_total")],
    )


DASHBOARDS = {
    "overview": overview,
    "gateway": gateway,
    "broker": broker,
    "session": session,
    "toolexec": toolexec,
}


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard, as committed."""
    return {
        f"{name}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }
