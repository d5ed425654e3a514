"""The Helm chart: Helm's strict lint, a render of every example values file, every
object valid for the oldest and newest Kubernetes the chart supports, the CRD kinds
valid for their own schemas, and the rules and dashboards taken from their one source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring
from kubernetes_validate import utils as kubernetes_validate

from tools.chart import CHART, EXAMPLES, Object, merge, of_kind, render, values_file
from tools.prometheus_server import promtool

ROOT = Path(__file__).resolve().parents[2]
# The oldest and newest Kubernetes the chart supports (Chart.yaml's kubeVersion: >=1.27).
KUBERNETES = ("1.27.0", "1.37.0")
EXAMPLE_FILES = sorted(EXAMPLES.glob("values-*.yaml"))
HTTPROUTE_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "httproute-v1.json").read_text())
# Kinds that are not in Kubernetes' own schemas, and how each is checked.
CRD_MODELS: dict[str, Any] = {
    "ServiceMonitor": monitoring.ServiceMonitor,
    "PrometheusRule": monitoring.PrometheusRule,
    "ScaledObject": keda.ScaledObject,
}


@pytest.fixture(scope="module", params=EXAMPLE_FILES, ids=lambda p: p.stem)
def example(request: pytest.FixtureRequest) -> tuple[Path, list[Object]]:
    path: Path = request.param
    return path, render(values_file(path))


def test_there_are_minimal_production_and_redis_cluster_examples() -> None:
    names = {p.stem for p in EXAMPLE_FILES}
    assert names == {"values-minimal", "values-production", "values-redis-cluster"}


@pytest.mark.parametrize("kube_version", KUBERNETES)
@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_helm_lint_strict_passes(path: Path, kube_version: str) -> None:
    report = helm.lint(
        CHART, values_file(path), strict=True, kube_version=f"v{kube_version}", namespace="sb"
    )
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    # Severity 2 is a warning, 3 an error (strict lint fails on both); 1 is information.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems


def test_every_object_is_valid_kubernetes(example: tuple[Path, list[Object]]) -> None:
    path, objects = example
    core = [o for o in objects if o["kind"] not in CRD_MODELS and o["kind"] != "HTTPRoute"]
    assert len(core) >= 10, f"{path.name} rendered only {len(core)} objects"
    for version in KUBERNETES:
        for obj in core:
            # Strict: an unknown field anywhere is an error, not a warning.
            kubernetes_validate.validate(obj, version, strict=True)


def strict_model_check(obj: Object) -> None:
    """Valid for the kind's model, and nothing in it that the model does not know."""
    model = CRD_MODELS[obj["kind"]]
    parsed = model.model_validate(obj)
    # The models ignore unknown fields: a field dropped on the way back is one.
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == obj


def test_every_custom_resource_is_valid_for_its_schema(example: tuple[Path, list[Object]]) -> None:
    _, objects = example
    for obj in objects:
        if obj["kind"] in CRD_MODELS:
            strict_model_check(obj)
        elif obj["kind"] == "HTTPRoute":
            jsonschema.validate(obj, HTTPROUTE_SCHEMA)


def test_the_crd_checks_can_fail() -> None:
    objects = render(values_file(EXAMPLES / "values-redis-cluster.yaml"))
    monitor = of_kind(objects, "ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(AssertionError):
        strict_model_check(monitor)
    scaled = of_kind(objects, "ScaledObject")[0]
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(ValueError, match="minReplicaCount"):
        strict_model_check(scaled)
    route = of_kind(objects, "HTTPRoute")[0]
    route["spec"]["rules"][0]["timeouts"]["request"] = "forever"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, HTTPROUTE_SCHEMA)


def test_the_examples_cover_every_template() -> None:
    kinds = {o["kind"] for path in EXAMPLE_FILES for o in render(values_file(path))}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "HTTPRoute",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }


def test_the_rendered_rules_pass_promtool(tmp_path: Path) -> None:
    objects = render(values_file(EXAMPLES / "values-production.yaml"))
    (rule,) = of_kind(objects, "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in rule["spec"]["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_the_rules_are_deploy_prometheus_alerts_itself() -> None:
    link = CHART / "files" / "prometheus"
    assert link.is_symlink() and link.resolve() == ROOT / "deploy" / "prometheus"
    objects = render(values_file(EXAMPLES / "values-production.yaml"))
    (rule,) = of_kind(objects, "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


def test_the_dashboards_are_deploy_grafana_dashboards_themselves() -> None:
    link = CHART / "files" / "dashboards"
    assert link.is_symlink() and link.resolve() == ROOT / "deploy" / "grafana" / "dashboards"
    objects = render(values_file(EXAMPLES / "values-production.yaml"))
    maps = [
        o for o in of_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]
    ]
    shipped = {name: text for cm in maps for name, text in cm["data"].items()}
    sources = {p.name: p.read_text() for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")}
    assert set(shipped) == set(sources) and len(sources) >= 5
    for name, text in sources.items():
        assert json.loads(shipped[name]) == json.loads(text), name
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Switchboard"


def test_the_packaged_chart_carries_the_rules_and_dashboards(tmp_path: Path) -> None:
    """`helm package` follows the links, so a chart from a repository has the files."""
    with helm.Chart.load(CHART) as chart:
        archive = chart.save(tmp_path)
    with helm.Chart.load(archive) as packaged:
        names = {f["name"] for f in packaged.files}
    assert "files/prometheus/alerts.yaml" in names
    assert "files/prometheus/alerts_test.yaml" not in names  # .helmignore
    assert {
        f"files/dashboards/{p.name}" for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")
    } <= names


# Blocks of Kubernetes fields (and annotation maps): documented as a whole by the
# comment above the block.
K8S_BLOCKS = {
    "resources",
    "podSecurityContext",
    "containerSecurityContext",
    "requests",
    "limits",
    "annotations",
}


def undocumented_values(text: str) -> list[str]:
    """Keys of values.yaml with no comment line right above them. A section (a key
    whose children are more values) needs none; its values do. Inside a block of
    Kubernetes fields (resources, security contexts) only the block needs one."""
    lines = text.splitlines()
    missing = []
    ancestors: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        inside_block = any(name in K8S_BLOCKS for _, name in ancestors)
        ancestors.append((indent, key))
        is_section = stripped.endswith(":") and key not in K8S_BLOCKS
        if inside_block or is_section:
            continue
        if not lines[number - 1].strip().startswith("#"):
            missing.append(f"line {number + 1}: {stripped}")
    return missing


def test_values_are_all_documented() -> None:
    assert not undocumented_values((CHART / "values.yaml").read_text())
    assert undocumented_values("a:\n  # -- fine\n  b: 1\n  c: 2\n") == ["line 4: c: 2"]


def test_the_schema_knows_every_value_and_refuses_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: Any, node: dict[str, Any], path: str) -> None:
        node = _resolve(schema, node)
        if not isinstance(values, dict) or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or 'top'} takes unknown keys"
        for key, value in values.items():
            assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
            walk(value, node["properties"][key], f"{path}.{key}")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_defaults_alone_are_refused_until_a_tenant_source_is_named() -> None:
    with pytest.raises(helm.HelmValuesError, match="/tenants"):
        render({})
    assert render({"tenants": {"devKeys": "dev=" + "0" * 64}})


def test_the_supported_kubernetes_versions_are_the_ones_tested() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES[0]}-0"
    assert KUBERNETES[-1] in kubernetes_validate.all_versions()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"Kubernetes {KUBERNETES[0][:-2]} to {KUBERNETES[-1][:-2]}" in docs


def test_an_override_file_merges_like_helm() -> None:
    merged = merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"c": 3}, "l": [2]})
    assert merged == {"a": {"b": 1, "c": 3}, "l": [2]}
