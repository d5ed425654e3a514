"""The Helm chart rendered offline into Kubernetes objects: its tests and `make smoke-deploy`.

Rendering goes through `helm-python-sdk`, Helm's own Go code as a library: the
same template engine, values merge and `values.schema.json` check as
`helm install`, without a cluster (`lookup` finds nothing).

    objects = render(values_file(EXAMPLES / "values-minimal.yaml"))
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "switchboard"
EXAMPLES = CHART / "examples"
RELEASE = "sb"
NAMESPACE = "switchboard"

Values = dict[str, Any]
Object = dict[str, Any]


def values_file(path: Path) -> Values:
    """The values in one YAML file (an empty file is no values)."""
    loaded = yaml.safe_load(path.read_text())
    return dict(loaded or {})


def merge(base: Values, *overrides: Values) -> Values:
    """Values merged as Helm merges `-f a.yaml -f b.yaml`: maps deeply, the rest replaced."""
    merged = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged


def render_files(
    values: Values, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Every template's output by its path (NOTES.txt included), as `helm template` makes it.

    Raises:
        helm_python.HelmValuesError: the values break values.schema.json.
        helm_python.HelmRenderError: a template failed (e.g. a `fail` naming a value).
    """
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def render(values: Values, *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[Object]:
    """The Kubernetes objects the chart makes from these values, in template order."""
    objects: list[Object] = []
    for path, text in sorted(render_files(values, name=name, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: Values, *, name: str = RELEASE, namespace: str = NAMESPACE) -> str:
    """The NOTES.txt Helm prints after an install with these values."""
    files = render_files(values, name=name, namespace=namespace)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[Object], kind: str) -> list[Object]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Object], kind: str, component: str) -> Object:
    """The one object of this kind whose app.kubernetes.io/component is `component`."""
    (found,) = [
        o
        for o in of_kind(objects, kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return found
