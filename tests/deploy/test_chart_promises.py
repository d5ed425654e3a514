"""What the chart promises, checked on the objects it renders: drain sized to the
gateway's drain timeout, probes on the real health endpoints, locked-down pods,
NetworkPolicy peers, the broker's advertised address, autoscaling on the gateway's
own metric, and no secret outside a Secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tools.chart import EXAMPLES, Object, merge, named, of_kind, render, values_file

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "session", "broker", "toolexec")
BACKENDS = ("session", "broker", "toolexec")
MINIMAL = values_file(EXAMPLES / "values-minimal.yaml")
PRODUCTION = values_file(EXAMPLES / "values-production.yaml")


@pytest.fixture(scope="module")
def production() -> list[Object]:
    return render(PRODUCTION)


@pytest.fixture(scope="module")
def minimal() -> list[Object]:
    return render(MINIMAL)


def pod(deployment: Object) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Object) -> dict[str, Any]:
    (only,) = pod(deployment)["containers"]
    return dict(only)


def env(deployment: Object) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(deployment)["env"]}


@pytest.mark.parametrize("drain", [5, 25, 120])
def test_the_gateway_grace_period_covers_prestop_and_drain(drain: int) -> None:
    objects = render(merge(MINIMAL, {"gateway": {"drainTimeoutSeconds": drain}}))
    gateway = named(objects, "Deployment", "gateway")
    variables = env(gateway)
    assert variables["SWITCHBOARD_GATEWAY_DRAIN_TIMEOUT_S"]["value"] == str(drain)
    sleep = container(gateway)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # preStop runs inside the grace period; then the drain; then uvicorn's own 10 s shutdown.
    assert pod(gateway)["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain + 10


def test_the_backends_grace_covers_prestop_and_their_drain(production: list[Object]) -> None:
    for name in BACKENDS:
        deployment = named(production, "Deployment", name)
        sleep = int(container(deployment)["lifecycle"]["preStop"]["exec"]["command"][1])
        # switchboard.rpc.serve lets in-flight calls finish for 10 s after SIGTERM.
        assert pod(deployment)["terminationGracePeriodSeconds"] >= sleep + 10, name


def test_rolling_updates_keep_capacity_and_pdbs_cover_every_service(
    production: list[Object],
) -> None:
    for name in SERVICES:
        deployment = named(production, "Deployment", name)
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] >= 1, name
        budget = named(production, "PodDisruptionBudget", name)
        selector = budget["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        assert selector == deployment["spec"]["selector"]["matchLabels"], name


def test_the_gateway_probes_its_http_health_endpoints(production: list[Object]) -> None:
    gateway = container(named(production, "Deployment", "gateway"))
    (port,) = gateway["ports"]
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert gateway[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe


def test_the_backends_probe_grpc_health(production: list[Object]) -> None:
    for name in BACKENDS:
        backend = container(named(production, "Deployment", name))
        grpc_port = next(p["containerPort"] for p in backend["ports"] if p["name"] == "grpc")
        assert backend["startupProbe"]["grpc"]["port"] == grpc_port, name
        assert backend["readinessProbe"]["grpc"]["port"] == grpc_port, name
        assert "livenessProbe" in backend, name
    # The session's health follows Redis: its liveness must not, or a Redis outage restarts it.
    session = container(named(production, "Deployment", "session"))
    assert "tcpSocket" in session["livenessProbe"]


@pytest.mark.parametrize("example", ["values-minimal", "values-production", "values-redis-cluster"])
def test_every_pod_is_locked_down(example: str) -> None:
    for deployment in of_kind(render(values_file(EXAMPLES / f"{example}.yaml")), "Deployment"):
        spec = pod(deployment)
        name = deployment["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for box in spec["containers"]:
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert box["resources"]["requests"]["cpu"] and box["resources"]["requests"]["memory"]
            assert box["resources"]["limits"]["memory"], name
            # The only writable places are the volumes it mounts (/tmp, Redis' /data).
            assert {m["mountPath"] for m in box.get("volumeMounts", [])} & {"/tmp", "/data"}, name


def test_only_the_chart_image_and_the_official_redis_run(minimal: list[Object]) -> None:
    images = {container(d)["image"] for d in of_kind(minimal, "Deployment")}
    assert images == {"localhost/switchboard:0.1.0", "docker.io/library/redis:7.4.2"}
    digest = "sha256:" + "a" * 64
    pinned = render(merge(MINIMAL, {"image": {"digest": digest}}))
    assert container(named(pinned, "Deployment", "gateway"))["image"].endswith("@" + digest)


def ingress_peers(policy: Object, port: int) -> list[Any]:
    """The `from` lists of the rules that open `port` (None for a rule open to all)."""
    return [
        rule.get("from")
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port for p in rule["ports"])
    ]


def component_of(peer: dict[str, Any]) -> str | None:
    labels = peer.get("podSelector", {}).get("matchLabels", {})
    return labels.get("app.kubernetes.io/component")


def test_only_the_gateway_takes_traffic_from_outside(minimal: list[Object]) -> None:
    gateway = named(minimal, "NetworkPolicy", "gateway")
    assert ingress_peers(gateway, 8080) == [None]  # anyone (gatewayFrom is empty)
    for name in BACKENDS:
        policy = named(minimal, "NetworkPolicy", name)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        grpc = named(minimal, "Deployment", name)
        grpc_port = next(
            p["containerPort"] for p in container(grpc)["ports"] if p["name"] == "grpc"
        )
        (peers,) = ingress_peers(policy, grpc_port)
        # gRPC (Attach included, for the broker) from the gateway's pods only.
        assert [component_of(p) for p in peers] == ["gateway"], name
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert opened == {p["containerPort"] for p in container(grpc)["ports"]}, name
    redis = named(minimal, "NetworkPolicy", "redis")
    (peers,) = ingress_peers(redis, 6379)
    assert sorted(component_of(p) or "" for p in peers) == ["gateway", "session", "toolexec"]
    simulator = named(minimal, "NetworkPolicy", "simulator")
    (peers,) = ingress_peers(simulator, 8090)
    assert [component_of(p) for p in peers] == ["broker"]


def egress_ports(policy: Object) -> set[int]:
    return {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}


def test_egress_is_limited_to_what_each_service_needs(production: list[Object]) -> None:
    policies = {name: named(production, "NetworkPolicy", name) for name in SERVICES}
    # DNS everywhere; Redis (external, 6379) for the gateway, session and toolexec; OTLP (4318).
    assert egress_ports(policies["session"]) == {53, 6379, 4318}
    assert egress_ports(policies["gateway"]) == {53, 6379, 4318, 50051, 50052, 50053}
    # The broker reaches the upstreams (443) and no Redis.
    assert egress_ports(policies["broker"]) == {53, 4318, 443}
    # toolexec reaches the tenants' webhooks (443).
    assert egress_ports(policies["toolexec"]) == {53, 6379, 4318, 443}
    upstream = next(r for r in policies["broker"]["spec"]["egress"] if r["ports"][0]["port"] == 443)
    (block,) = upstream["to"]
    # Not the pod network, not the cloud metadata service.
    assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block["ipBlock"]["except"])
    # The gateway reaches its backends' pods only.
    backends = [
        r for r in policies["gateway"]["spec"]["egress"] if r.get("to") and component_of(r["to"][0])
    ]
    assert sorted(component_of(r["to"][0]) or "" for r in backends) == [
        "broker",
        "session",
        "toolexec",
    ]


def test_the_broker_advertises_its_pod_ip(production: list[Object]) -> None:
    broker = named(production, "Deployment", "broker")
    names = [item["name"] for item in container(broker)["env"]]
    variables = env(broker)
    assert variables["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    port = next(p["containerPort"] for p in container(broker)["ports"] if p["name"] == "grpc")
    assert variables["SWITCHBOARD_BROKER_ADVERTISE_ADDRESS"]["value"] == f"$(POD_IP):{port}"
    # Kubernetes expands $(POD_IP) only from variables defined before it.
    assert names.index("POD_IP") < names.index("SWITCHBOARD_BROKER_ADVERTISE_ADDRESS")
    assert variables["SWITCHBOARD_BROKER_LISTEN"]["value"] == f"0.0.0.0:{port}"


def test_the_gateway_scales_on_the_connections_it_exports(production: list[Object]) -> None:
    (hpa,) = [
        h
        for h in of_kind(production, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"].endswith("-gateway")
    ]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    assert re.search(rf"\| `{name}` \| gauge \|", metrics_doc), name
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1000"}
    rule = next(
        c
        for c in of_kind(production, "ConfigMap")
        if c["metadata"]["name"].endswith("prometheus-adapter-rule")
    )
    assert name in rule["data"]["rule.yaml"]
    assert "replicas" not in named(production, "Deployment", "gateway")["spec"]
    (broker_hpa,) = [h for h in of_kind(production, "HorizontalPodAutoscaler") if h is not hpa]
    assert broker_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_keda_scales_on_the_same_metric() -> None:
    objects = render(values_file(EXAMPLES / "values-redis-cluster.yaml"))
    (scaled,) = of_kind(objects, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(switchboard_gateway_connections_active{")
    assert not [
        h for h in of_kind(objects, "HorizontalPodAutoscaler") if "gateway" in h["metadata"]["name"]
    ]


def test_monitoring_objects_cover_all_four_services(production: list[Object]) -> None:
    monitors = of_kind(production, "ServiceMonitor")
    jobs = {m["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for m in monitors}
    # The alerts select targets whose job mentions switchboard (deploy/prometheus/alerts.yaml).
    assert jobs == {f"switchboard-{name}" for name in SERVICES}
    for monitor in monitors:
        component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        service = named(production, "Service", component)
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in port_names, component
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
    assert of_kind(production, "PrometheusRule")
    assert (
        len(
            [
                c
                for c in of_kind(production, "ConfigMap")
                if "grafana_dashboard" in c["metadata"]["labels"]
            ]
        )
        == 5
    )
    for name in SERVICES:
        assert (
            env(named(production, "Deployment", name))["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
            == "http://otel-collector.observability.svc:4318"
        )


def test_ingress_routes_only_the_client_api_with_long_timeouts(production: list[Object]) -> None:
    (ingress,) = of_kind(production, "Ingress")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1"]  # never /metrics
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    route = of_kind(render(values_file(EXAMPLES / "values-redis-cluster.yaml")), "HTTPRoute")[0]
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "0s"}
    assert route["spec"]["rules"][0]["matches"] == [
        {"path": {"type": "PathPrefix", "value": "/v1"}}
    ]


SENTINELS = {
    "upstream": "sk-upstream-SENTINEL-1",
    "redis": "redis-pass-SENTINEL-2",
    "tenants": "tenants-file-SENTINEL-3",
    "bundled": "bundled-redis-SENTINEL-4",
}


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


@pytest.mark.parametrize("redis_mode", ["external", "bundled"])
def test_no_secret_reaches_a_configmap_or_an_env_literal(redis_mode: str) -> None:
    values = merge(
        MINIMAL,
        {
            "tenants": {"devKeys": "", "file": f"# {SENTINELS['tenants']}\ntenants: {{}}\n"},
            "upstreams": {"env": {"OPENAI_API_KEY": SENTINELS["upstream"]}},
            "redis": {
                "mode": redis_mode,
                "external": {"url": f"redis://:{SENTINELS['redis']}@redis:6379/0"},
                "bundled": {"password": SENTINELS["bundled"]},
            },
            "metrics": {"dashboards": {"enabled": True}},
        },
    )
    objects = render(values)
    in_secrets = " ".join(s for o in of_kind(objects, "Secret") for s in strings(o))
    expected = {"upstream", "tenants", "redis" if redis_mode == "external" else "bundled"}
    for key in expected:
        assert SENTINELS[key] in in_secrets, key
    # Anywhere outside a Secret: ConfigMaps, env literals, annotations, args.
    for obj in objects:
        if obj["kind"] != "Secret":
            leaked = [k for k, s in SENTINELS.items() if any(s in text for text in strings(obj))]
            assert not leaked, f"{obj['kind']} {obj['metadata']['name']} holds {leaked}"


def test_secrets_reach_the_pods_by_reference(minimal: list[Object]) -> None:
    for name in ("gateway", "session", "toolexec"):
        redis_url = env(named(minimal, "Deployment", name))["SWITCHBOARD_REDIS_URL"]
        assert redis_url["valueFrom"]["secretKeyRef"]["key"] == "redis-url", name
    with_file = render(merge(MINIMAL, {"tenants": {"devKeys": "", "existingSecret": "mine"}}))
    for name in ("gateway", "broker", "toolexec"):
        deployment = named(with_file, "Deployment", name)
        assert (
            env(deployment)["SWITCHBOARD_TENANTS_FILE"]["value"]
            == "/etc/switchboard/tenants/tenants.yaml"
        )
        volume = next(v for v in pod(deployment)["volumes"] if v["name"] == "tenants")
        assert volume["secret"]["secretName"] == "mine", name
    # An existing Secret is used, not created.
    assert not [s for s in of_kind(with_file, "Secret") if "tenants" in s["metadata"]["name"]]


def test_notes_tell_how_to_reach_mint_and_watch() -> None:
    from tools.chart import notes

    text = notes(PRODUCTION)
    assert "wss://realtime.example.com/v1/realtime" in text
    assert "python -m switchboard.tenancy new-key" in text
    assert "Grafana" in text and "switchboard-tenants" in text
    trial = notes(MINIMAL)
    assert "port-forward service/sb-switchboard-gateway" in trial
    assert "SIMULATOR" in trial and "bundled single pod" in trial
