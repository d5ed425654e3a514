"""Read the committed dashboards back: their panels and PromQL, ready to run.

Used by the tests that evaluate every panel query against a real Prometheus
and by tools/render_panels.py. Grafana's template variables are replaced the
way Grafana would with everything selected: `$model` (and `${model}`) by the
variable's `All` value `.*`, `$__rate_interval` by a window of a few scrapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"

JSON = dict[str, Any]


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    legend: str
    unit: str


def load_all(directory: Path = DASHBOARDS_DIR) -> dict[str, JSON]:
    """Every dashboard file of `directory`, by file name without `.json`."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def panels(dashboard: JSON) -> list[JSON]:
    """The dashboard's panels that show data (rows left out, collapsed rows opened)."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries(dashboard: JSON) -> list[PanelQuery]:
    return [
        PanelQuery(
            dashboard=dashboard["uid"],
            panel=panel["title"],
            ref_id=target["refId"],
            expr=target["expr"],
            legend=target.get("legendFormat", ""),
            unit=panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def all_values(dashboard: JSON) -> dict[str, str]:
    """What each query variable stands for with everything selected."""
    return {
        variable["name"]: variable.get("allValue") or ".*"
        for variable in dashboard.get("templating", {}).get("list", [])
        if variable.get("type") == "query"
    }


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """`expr` with Grafana's variables replaced; an unknown variable raises KeyError."""
    builtins = {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": "1h"}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return builtins[name] if name in builtins else values[name]

    return _VARIABLE.sub(replace, expr)


def label_values_query(variable: JSON) -> tuple[str, str]:
    """The metric and label of a `label_values(metric, label)` variable query."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
    if match is None:
        raise ValueError(f"variable {variable['name']}: not a label_values() query: {text}")
    return match.group(1), match.group(2)
