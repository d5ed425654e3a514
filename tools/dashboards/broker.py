"""Panels of the broker's metrics: upstream calls, retries, admission control."""

from __future__ import annotations

from tools.dashboards.panels import (
    COUNT,
    JSON,
    PER_SECOND,
    RATIO,
    SECONDS,
    UPSTREAM,
    Query,
    quantiles,
    rate,
    timeseries,
)

UPSTREAM_REQUESTS = "switchboard_broker_upstream_requests_total"


def upstream_latency(width: int = 8) -> JSON:
    return timeseries(
        "Upstream latency p95",
        "The upstream's time to first token and whole upstream calls, by upstream.",
        SECONDS,
        Query(
            quantiles(
                "switchboard_broker_upstream_time_to_first_token_seconds",
                UPSTREAM,
                "upstream",
                (0.95,),
            )[0].expr,
            "first token {{upstream}}",
        ),
        Query(
            quantiles(
                "switchboard_broker_upstream_request_duration_seconds",
                UPSTREAM,
                "upstream",
                (0.95,),
            )[0].expr,
            "whole call {{upstream}}",
        ),
        width=width,
    )


def upstream_errors(width: int = 8) -> JSON:
    return timeseries(
        "Upstream errors by code",
        "Failed upstream calls per second, by upstream and error code.",
        PER_SECOND,
        Query(
            rate("switchboard_broker_upstream_errors_total", UPSTREAM, "upstream, code"),
            "{{upstream}}: {{code}}",
        ),
        width=width,
        stacked=True,
    )


def upstream_error_ratio(width: int = 8) -> JSON:
    failed = rate(UPSTREAM_REQUESTS, f'outcome="failed",{UPSTREAM}', "upstream")
    settled = rate(UPSTREAM_REQUESTS, f'outcome!="cancelled",{UPSTREAM}', "upstream")
    return timeseries(
        "Upstream error ratio",
        "Share of upstream calls (cancelled ones aside) that failed, by upstream.",
        RATIO,
        Query(f"{failed} / {settled}", "{{upstream}}"),
        width=width,
        max_value=1,
    )


def retries(width: int = 8) -> JSON:
    return timeseries(
        "Upstream retries by reason",
        "Attempts that failed before the first token and were tried again, per second.",
        PER_SECOND,
        Query(
            rate("switchboard_broker_upstream_retries_total", UPSTREAM, "upstream, reason"),
            "{{upstream}}: {{reason}}",
        ),
        width=width,
        stacked=True,
    )


def admission_rejections(width: int = 12) -> JSON:
    return timeseries(
        "Admission rejections (server_busy)",
        "Calls refused by an upstream's admission control per second, by reason.",
        PER_SECOND,
        Query(
            rate("switchboard_broker_admission_rejections_total", UPSTREAM, "upstream, reason"),
            "{{upstream}}: {{reason}}",
        ),
        width=width,
        stacked=True,
    )


def queue_depth(width: int = 8) -> JSON:
    return timeseries(
        "Queue depth and calls in flight",
        "Calls waiting for an upstream's concurrency slot, calls holding one, "
        "and Generate streams in progress in the broker.",
        COUNT,
        Query(
            f"sum by (upstream) (switchboard_broker_admission_queued_requests{{{UPSTREAM}}})",
            "queued {{upstream}}",
        ),
        Query(
            f"sum by (upstream) (switchboard_broker_admission_running_requests{{{UPSTREAM}}})",
            "running {{upstream}}",
        ),
        Query("sum(switchboard_broker_streams_active)", "broker streams"),
        width=width,
    )


def breaker_open(width: int = 8) -> JSON:
    return timeseries(
        "Circuit breakers not closed",
        "1 while an upstream's circuit breaker is open or half open.",
        COUNT,
        Query(
            "max by (upstream, state) "
            f'(switchboard_broker_circuit_breaker_state{{state!="closed",{UPSTREAM}}})',
            "{{upstream}} {{state}}",
        ),
        width=width,
    )


def upstream_requests(width: int = 8) -> JSON:
    return timeseries(
        "Upstream calls by outcome",
        "Upstream calls ended per second: completed, failed, cancelled.",
        PER_SECOND,
        Query(rate(UPSTREAM_REQUESTS, UPSTREAM, "upstream, outcome"), "{{upstream}}: {{outcome}}"),
        width=width,
        stacked=True,
    )
