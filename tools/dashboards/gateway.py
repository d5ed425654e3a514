"""Panels of the gateway's metrics: what clients see.

The TTFT objective (95% of first tokens within 1 s) is the one the alert rules
in deploy/prometheus/alerts.yaml guard (docs/observability.md).
"""

from __future__ import annotations

from tools.dashboards.panels import (
    COUNT,
    EVENTS_PER_SECOND,
    JSON,
    MODEL,
    P50_95_99,
    PER_SECOND,
    RATIO,
    SECONDS,
    TOKENS_PER_SECOND,
    UPSTREAM,
    USD,
    Query,
    quantiles,
    rate,
    stat,
    timeseries,
)

# The objective's threshold is a bucket boundary of the TTFT histogram.
TTFT_SLO_SECONDS = "1.0"
TTFT_SLO_TARGET = 0.95

TTFT = "switchboard_gateway_time_to_first_token_seconds"


def ttft_quantiles() -> JSON:
    return timeseries(
        "Time to first token (client) p50 / p95 / p99 by model",
        "From response.create received to the first delta sent to the client, "
        "as the user feels it.",
        SECONDS,
        *quantiles(TTFT, MODEL, "model", P50_95_99),
    )


def ttft_slo() -> JSON:
    good = rate(f"{TTFT}_bucket", f'le="{TTFT_SLO_SECONDS}",{MODEL}')
    return stat(
        "First tokens within 1 s (objective 95%)",
        "Share of responses whose first delta reached the client within 1 s.",
        RATIO,
        Query(f"{good} / {rate(f'{TTFT}_count', MODEL)}", "within 1 s"),
        height=8,
        red_below=TTFT_SLO_TARGET,
    )


def ttft_client_vs_upstream() -> JSON:
    client = quantiles(TTFT, MODEL, "", (0.95,))[0]
    upstream = quantiles(
        "switchboard_broker_upstream_time_to_first_token_seconds", UPSTREAM, "upstream", (0.95,)
    )[0]
    return timeseries(
        "TTFT p95: client vs upstream",
        "The client's time to first token next to the upstream's part of it: "
        "the gap is Switchboard's own (context, admission, retries).",
        SECONDS,
        Query(client.expr, "client p95"),
        Query(upstream.expr, "upstream p95 {{upstream}}"),
        width=6,
    )


def inter_token() -> JSON:
    return timeseries(
        "Inter-token latency p50 / p95 by model",
        "Gap between two consecutive deltas sent to the client.",
        SECONDS,
        *quantiles("switchboard_gateway_inter_token_seconds", MODEL, "model", (0.5, 0.95)),
    )


def active_connections(width: int = 8) -> JSON:
    return timeseries(
        "Active connections and sessions",
        "Open client WebSocket connections and the sessions they serve.",
        COUNT,
        Query("sum(switchboard_gateway_connections_active)", "connections"),
        Query("sum(switchboard_gateway_sessions_active)", "sessions"),
        width=width,
    )


def disconnects(width: int = 8) -> JSON:
    return timeseries(
        "Disconnect rate by reason",
        "Connections ended or refused per second: client_closed is normal; "
        "upstream_error, server_error, slow_consumer and protocol_error are not.",
        EVENTS_PER_SECOND,
        Query(rate("switchboard_gateway_disconnects_total", by="reason"), "{{reason}}"),
        width=width,
        stacked=True,
    )


def connections_opened(width: int = 8) -> JSON:
    return timeseries(
        "Connections opened by tier",
        "Client connections accepted per second, by the tenant's tier.",
        EVENTS_PER_SECOND,
        Query(rate("switchboard_gateway_connections_opened_total", by="tier"), "{{tier}}"),
        width=width,
        stacked=True,
    )


def tokens_per_second(width: int = 8) -> JSON:
    return timeseries(
        "Tokens per second",
        "Input and output tokens of finished responses.",
        TOKENS_PER_SECOND,
        Query(
            rate("switchboard_gateway_tokens_total", MODEL, "model, direction"),
            "{{direction}} {{model}}",
        ),
        width=width,
    )


def responses_by_status(width: int = 8) -> JSON:
    return timeseries(
        "Responses by status",
        "Responses ended per second: completed, cancelled, incomplete, failed.",
        PER_SECOND,
        Query(rate("switchboard_gateway_responses_total", MODEL, "status"), "{{status}}"),
        width=width,
        stacked=True,
    )


def error_rate(width: int = 8) -> JSON:
    responses = "switchboard_gateway_responses_total"
    failed = rate(responses, f'status="failed",{MODEL}')
    return timeseries(
        "Error rate",
        "Share of responses that ended failed (the upstream or Switchboard failed them).",
        RATIO,
        Query(f"({failed} or vector(0)) / {rate(responses, MODEL)}", "failed responses"),
        width=width,
        max_value=1,
    )


def errors_by_code(width: int = 12) -> JSON:
    return timeseries(
        "Errors sent to clients by code",
        "error events per second, by error code (docs/errors.md).",
        EVENTS_PER_SECOND,
        Query(rate("switchboard_gateway_errors_total", by="code"), "{{code}}"),
        width=width,
        stacked=True,
    )


def rate_limit_rejections(width: int = 12) -> JSON:
    return timeseries(
        "Rate-limit and quota rejections",
        "Requests refused per second by a tenant limit (rate_limit_exceeded, "
        "insufficient_quota) or by a gateway shedding load (server_busy), by tier.",
        PER_SECOND,
        Query(rate("switchboard_gateway_rejections_total", by="code, tier"), "{{code}} ({{tier}})"),
        width=width,
        stacked=True,
    )


def event_loop_lag(width: int = 8) -> JSON:
    return timeseries(
        "Event loop lag (load shedding)",
        "How late the gateways' event loops run their timers, smoothed over a second: "
        "above SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS (250 ms by default) a gateway refuses "
        "new connections, responses and requests with server_busy (docs/performance.md).",
        SECONDS,
        Query("max(switchboard_gateway_event_loop_lag_seconds)", "worst gateway"),
        Query("avg(switchboard_gateway_event_loop_lag_seconds)", "mean"),
        width=width,
    )


def response_duration() -> JSON:
    return timeseries(
        "Response duration p95 by model and status",
        "From response.create to response.done.",
        SECONDS,
        *quantiles(
            "switchboard_gateway_response_duration_seconds", MODEL, "model, status", (0.95,)
        ),
    )


def cost_by_tier_and_model(width: int = 16) -> JSON:
    return timeseries(
        "Cost by tier and model (USD per hour)",
        "Cost of finished responses, from their usage and the tenants file's prices "
        "(docs/tenants.md#prices), by tenant tier and model, at the current rate.",
        USD,
        Query(
            f"3600 * {rate('switchboard_gateway_cost_usd_total', MODEL, 'tier, model')}",
            "{{tier}} {{model}}",
        ),
        width=width,
        stacked=True,
    )


def cost_in_range(width: int = 8) -> JSON:
    return stat(
        "Cost over the time range",
        "US dollars spent on finished responses over the dashboard's time range.",
        USD,
        Query(f"sum(increase(switchboard_gateway_cost_usd_total{{{MODEL}}}[$__range]))", "cost"),
        width=width,
        height=8,
    )
