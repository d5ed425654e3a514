"""The Prometheus rules load, do what their unit tests say, and read real metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tools.prometheus_server import promtool

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
ALERTS = RULES_DIR / "alerts.yaml"
METRIC = re.compile(r"\b(switchboard_[a-z0-9_]+)")


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def documented_metric(name: str) -> bool:
    text = (ROOT / "docs" / "metrics.md").read_text()
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    return f"`{base}`" in text


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yaml", cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_and_explained() -> None:
    tests = yaml.safe_load((RULES_DIR / "alerts_test.yaml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == tested
    for rule in alerts:
        assert rule["alert"].startswith("Switchboard"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_read_only_documented_metrics() -> None:
    names = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    assert names, "no switchboard_ metric in the rules"
    undocumented = sorted(name for name in names if not documented_metric(name))
    assert not undocumented, f"not in docs/metrics.md: {undocumented}"
