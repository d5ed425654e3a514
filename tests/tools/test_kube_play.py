"""The rendered chart made playable by podman kube play (tools/smoke_deploy/kube_play.py):
Secrets put in place, $(VAR) expanded as the kubelet does, Services as a hosts file,
readiness probes kept for the harness."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tools.chart import EXAMPLES, merge, render, values_file
from tools.smoke_deploy.kube_play import (
    container_name,
    expand,
    for_podman,
    hosts_file,
    resolve_env,
    secret_data,
)

WORKDIR = Path("/run/smoke")


def test_expand_follows_the_kubelet() -> None:
    known = {"POD_IP": "10.1.2.3", "PORT": "50052"}
    assert expand("$(POD_IP):$(PORT)", known) == "10.1.2.3:50052"
    assert expand("$(UNKNOWN)", known) == "$(UNKNOWN)"
    assert expand("$$(POD_IP)", known) == "$(POD_IP)"
    assert expand("no reference", known) == "no reference"


def test_env_takes_secrets_pod_ip_and_earlier_variables() -> None:
    secrets = {"keys": {"OPENAI_API_KEY": "sk-1"}, "redis": {"url": "redis://:p@r:6379/0"}}
    box = {
        "envFrom": [{"secretRef": {"name": "keys"}}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "ADDRESS", "value": "$(POD_IP):50052"},
            {"name": "EARLY", "value": "$(LATE)"},
            {"name": "LATE", "value": "x"},
            {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}},
        ],
    }
    env = {item["name"]: item["value"] for item in resolve_env(box, secrets)}
    assert env == {
        "OPENAI_API_KEY": "sk-1",
        "POD_IP": "127.0.0.1",
        "ADDRESS": "127.0.0.1:50052",
        "EARLY": "$(LATE)",  # only variables defined before are expanded
        "LATE": "x",
        "URL": "redis://:p@r:6379/0",
    }
    with pytest.raises(ValueError, match=r"metadata\.uid"):
        resolve_env(
            {"env": [{"name": "U", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}]}, {}
        )


def test_secret_data_reads_both_forms() -> None:
    secret = {"data": {"a": base64.b64encode(b"one").decode()}, "stringData": {"b": "two"}}
    assert secret_data(secret) == {"a": "one", "b": "two"}


def test_services_become_host_names_of_127_0_0_1() -> None:
    text = hosts_file(
        [{"metadata": {"name": "sb-switchboard-session", "namespace": "ns"}}]
    ).decode()
    assert (
        "127.0.0.1 sb-switchboard-session sb-switchboard-session.ns "
        "sb-switchboard-session.ns.svc sb-switchboard-session.ns.svc.cluster.local"
    ) in text


@pytest.fixture(scope="module")
def objects() -> list[dict[str, object]]:
    values = merge(
        values_file(EXAMPLES / "values-minimal.yaml"),
        {"tenants": {"devKeys": "", "file": "tenants: {}\n"}},
    )
    return render(values)


def test_the_minimal_install_becomes_six_host_network_pods(objects: list) -> None:
    playable = for_podman(objects, WORKDIR)
    names = [d["metadata"]["name"] for d in playable.manifests]
    assert [n.rsplit("-", 1)[1] for n in names] == [
        "broker",
        "gateway",
        "redis",
        "session",
        "simulator",
        "toolexec",
    ]
    assert playable.left_out == ["NetworkPolicy", "ServiceAccount"]
    for deployment in playable.manifests:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True
        for box in pod["containers"]:
            assert "ports" not in box and "envFrom" not in box
            assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(box)
            assert all("valueFrom" not in item for item in box.get("env", []))
            assert {"name": "hosts", "mountPath": "/etc/hosts", "readOnly": True} in box[
                "volumeMounts"
            ]
        assert not [v for v in pod["volumes"] if "secret" in v]
    # The original objects are left as rendered.
    assert any(
        "ports" in c
        for d in objects
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    )


def test_secret_volumes_become_files_and_env_gets_values(objects: list) -> None:
    playable = for_podman(objects, WORKDIR)
    gateway = next(d for d in playable.manifests if d["metadata"]["name"].endswith("-gateway"))
    tenants = next(
        v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "tenants"
    )
    directory = Path(tenants["hostPath"]["path"])
    assert playable.files[directory / "tenants.yaml"] == b"tenants: {}\n"
    env = {
        e["name"]: e["value"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    redis_secret = next(
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-redis")
    )
    assert env["SWITCHBOARD_REDIS_URL"] == secret_data(redis_secret)["redis-url"]
    assert env["SWITCHBOARD_REDIS_URL"].startswith("redis://:")
    broker = next(d for d in playable.manifests if d["metadata"]["name"].endswith("-broker"))
    env = {
        e["name"]: e["value"] for e in broker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SWITCHBOARD_BROKER_ADVERTISE_ADDRESS"] == "127.0.0.1:50052"


def test_readiness_probes_and_grace_periods_are_kept_for_the_harness(objects: list) -> None:
    playable = for_podman(objects, WORKDIR)
    by_deployment = {p.deployment.rsplit("-", 1)[1]: p for p in playable.probes}
    assert (by_deployment["gateway"].kind, by_deployment["gateway"].port) == ("httpGet", 8080)
    assert by_deployment["gateway"].path == "/readyz"
    assert (by_deployment["session"].kind, by_deployment["session"].port) == ("grpc", 50051)
    assert by_deployment["redis"].kind == "tcpSocket"
    assert playable.grace[container_name("sb-switchboard-gateway", "gateway")] == 5 + 25 + 15
