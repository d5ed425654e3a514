"""Wrong values fail `helm install` with a message naming the value (values.schema.json,
and the chart's own checks where a rule spans two values)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tools.chart import EXAMPLES, merge, render, values_file

MINIMAL = values_file(EXAMPLES / "values-minimal.yaml")

# (values over the minimal example, what the message must name)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("negative replicas", {"gateway": {"replicas": -1}}, "/gateway/replicas"),
    ("replicas as text", {"session": {"replicas": "two"}}, "/session/replicas"),
    ("unknown top-level key", {"gatway": {"replicas": 2}}, "'gatway'"),
    ("unknown nested key", {"broker": {"autoscaling": {"targetCPU": 50}}}, "'targetCPU'"),
    ("port out of range", {"toolexec": {"port": 70000}}, "/toolexec/port"),
    (
        "drain timeout of zero",
        {"gateway": {"drainTimeoutSeconds": 0}},
        "/gateway/drainTimeoutSeconds",
    ),
    ("log level unknown", {"logLevel": "verbose"}, "/logLevel"),
    ("redis mode unknown", {"redis": {"mode": "sentinel"}}, "/redis/mode"),
    (
        "redis URL not a redis URL",
        {"redis": {"mode": "external", "external": {"url": "http://r:6379"}}},
        "/redis/external/url",
    ),
    (
        "external redis without URL or secret",
        {"redis": {"mode": "external"}},
        "/redis/external/existingSecret",
    ),
    ("malformed tenant key pair", {"tenants": {"devKeys": "trial=not-a-hash"}}, "/tenants/devKeys"),
    ("image digest malformed", {"image": {"digest": "latest"}}, "/image/digest"),
    ("pull policy unknown", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    (
        "autoscaling provider unknown",
        {"gateway": {"autoscaling": {"provider": "cpu"}}},
        "/gateway/autoscaling/provider",
    ),
    (
        "CPU target over 100 %",
        {"broker": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
        "/broker/autoscaling/targetCPUUtilizationPercentage",
    ),
    ("sampling ratio over 1", {"otlp": {"samplingRatio": 2}}, "/otlp/samplingRatio"),
    ("OTLP endpoint without scheme", {"otlp": {"endpoint": "collector:4318"}}, "/otlp/endpoint"),
    (
        "resources quantity malformed",
        {"gateway": {"resources": {"limits": {"memory": "lots"}}}},
        "/gateway/resources/limits/memory",
    ),
    (
        "HTTPRoute timeout malformed",
        {"httpRoute": {"requestTimeout": "1 hour"}},
        "/httpRoute/requestTimeout",
    ),
    (
        "upstream variable name malformed",
        {"upstreams": {"env": {"OPENAI-API-KEY": "x"}}},
        "'OPENAI-API-KEY'",
    ),
    ("preStop sleep negative", {"preStopSleepSeconds": -5}, "/preStopSleepSeconds"),
]


@pytest.mark.parametrize(
    ("values", "names"), [(v, n) for _, v, n in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_the_schema_refuses_and_names_the_value(values: dict[str, Any], names: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(merge(MINIMAL, values))
    assert names in str(refused.value)


def test_a_missing_tenants_secret_is_refused_naming_the_three_ways() -> None:
    values = merge(MINIMAL, {"tenants": {"devKeys": ""}})
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    message = str(refused.value)
    for name in ("/tenants/existingSecret", "/tenants/file", "/tenants/devKeys"):
        assert name in message


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    values = merge(
        MINIMAL, {"gateway": {"drainTimeoutSeconds": 60, "terminationGracePeriodSeconds": 30}}
    )
    with pytest.raises(
        helm.HelmRenderError,
        match=r"gateway\.terminationGracePeriodSeconds \(30\) must be at least",
    ):
        render(values)
    # Long enough is taken as given.
    (deployment,) = [
        o
        for o in render(merge(values, {"gateway": {"terminationGracePeriodSeconds": 90}}))
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-gateway")
    ]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


def test_every_refusal_case_is_accepted_without_its_fault() -> None:
    """The cases above fail for their fault, not because the base is already wrong."""
    assert render(MINIMAL)
    assert len(REFUSED) >= 10
