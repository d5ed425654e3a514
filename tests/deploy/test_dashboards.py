"""The committed dashboards: generated, valid for Grafana, and reading real metrics."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import grafana_schema
from tests.deploy.test_alerts import documented_metric
from tools.dashboards.definitions import rendered
from tools.dashboards.queries import (
    DASHBOARDS_DIR,
    all_values,
    label_values_query,
    load_all,
    panel_queries,
    panels,
    substitute,
)
from tools.prometheus_server import promtool

DASHBOARDS = load_all()
EXPECTED = {"overview", "gateway", "broker", "session", "toolexec"}
# Grafana unit ids the panels may use (Grafana's "Standard options > Unit").
UNITS = {"currencyUSD", "s", "percentunit", "reqps", "cps", "short", "suffix: tok/s"}


def test_the_committed_files_are_what_the_generator_writes() -> None:
    files = rendered()
    assert set(files) == {p.name for p in DASHBOARDS_DIR.glob("*.json")}
    stale = [name for name, text in files.items() if (DASHBOARDS_DIR / name).read_text() != text]
    assert not stale, f"stale dashboards {stale}: run `make dashboards` and commit the result"


def test_there_is_an_overview_and_one_per_service() -> None:
    assert set(DASHBOARDS) == EXPECTED
    uids = [dashboard["uid"] for dashboard in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_dashboard_validates_against_grafanas_schema(name: str) -> None:
    assert grafana_schema.problems(DASHBOARDS[name]) == []


def test_the_schema_check_catches_mistakes() -> None:
    broken: dict[str, Any] = copy.deepcopy(DASHBOARDS["session"])
    panel = panels(broken)[0]
    panel["fieldConfig"]["defaults"]["custom"]["drawStyle"] = "zigzag"
    panel["gridPos"]["w"] = "wide"
    panel["targets"][0]["exprr"] = panel["targets"][0]["expr"]
    broken["graphTooltip"] = 7
    found = "\n".join(grafana_schema.problems(broken))
    assert "draw_style: 'zigzag' is not one of" in found
    assert "grid_pos.w: expected a int, got 'wide'" in found
    assert "exprr: not a field of the schema" in found
    assert "graph_tooltip: 7 is not one of [0, 1, 2]" in found


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_panel_reads_the_datasource_variable(name: str) -> None:
    dashboard = DASHBOARDS[name]
    variables = dashboard["templating"]["list"]
    assert variables[0]["name"] == "datasource"
    assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
    for variable in variables[1:]:
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        label_values_query(variable)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_parses_and_reads_documented_metrics(tmp_path: Path) -> None:
    queries = [
        (query, all_values(dashboard))
        for dashboard in DASHBOARDS.values()
        for query in panel_queries(dashboard)
    ]
    rules = []
    for number, (query, values) in enumerate(queries):
        expr = substitute(query.expr, values)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
        for metric in re.findall(r"\b(switchboard_[a-z0-9_]+)", expr):
            assert documented_metric(metric), f"{query.panel}: {metric} not in docs/metrics.md"
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
