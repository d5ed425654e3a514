"""Building blocks of Grafana dashboards (JSON model, schemaVersion 39).

Small functions that return the plain dicts Grafana stores: time series and
stat panels with one or more Prometheus queries, rows, template variables, and
`dashboard()`, which numbers the panels and lays them out on Grafana's
24-column grid. Every panel and query reads from the `$datasource` variable,
so an operator picks their Prometheus when importing. `rate()` and
`quantiles()` write the PromQL the panels share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

DATASOURCE: JSON = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
GRID_COLUMNS = 24

# Grafana unit ids used here (Grafana's "Standard options > Unit").
SECONDS = "s"
RATIO = "percentunit"
PER_SECOND = "reqps"
EVENTS_PER_SECOND = "cps"
TOKENS_PER_SECOND = "suffix: tok/s"
COUNT = "short"
USD = "currencyUSD"

# Grafana's own rate window (at least four scrape intervals), and the
# selectors of the multi-value variables (their `All` is `.*`).
RATE = "[$__rate_interval]"
MODEL = 'model=~"$model"'
UPSTREAM = 'upstream=~"$upstream"'
TOOL = 'tool=~"$tool"'


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """`sum [by (...)] (rate(metric{selector}[$__rate_interval]))`."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}{RATE}))"


def quantiles(metric: str, selector: str, by: str, qs: tuple[float, ...]) -> list[Query]:
    """One query per quantile of a histogram, per value of the `by` label."""
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")) if by else ""
    grouping = f"le, {by}" if by else "le"
    return [
        Query(
            f"histogram_quantile({q}, sum by ({grouping}) "
            f"(rate({metric}_bucket{{{selector}}}{RATE})))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in qs
    ]


P50_95_99 = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Query:
    """A PromQL expression and its legend (`{{label}}` placeholders)."""

    expr: str
    legend: str = ""


def _targets(queries: tuple[Query, ...]) -> list[JSON]:
    return [
        {
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": True,
            "refId": chr(ord("A") + index),
        }
        for index, query in enumerate(queries)
    ]


def timeseries(
    title: str,
    description: str,
    unit: str,
    *queries: Query,
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    max_value: float | None = None,
) -> JSON:
    """A time series panel: lines (or stacked areas) of each query's series."""
    defaults: JSON = {
        "unit": unit,
        "min": 0,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stacked else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        },
    }
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries),
    }


def stat(
    title: str,
    description: str,
    unit: str,
    *queries: Query,
    width: int = 6,
    height: int = 4,
    red_above: float | None = None,
    red_below: float | None = None,
) -> JSON:
    """A stat panel showing the last value of each query, red past a threshold."""
    steps: list[JSON] = [{"color": "green", "value": None}]
    if red_above is not None:
        steps.append({"color": "red", "value": red_above})
    if red_below is not None:
        steps = [{"color": "red", "value": None}, {"color": "green", "value": red_below}]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
        "targets": _targets(queries),
    }


def datasource_variable() -> JSON:
    """The `datasource` variable: any Prometheus data source of the Grafana."""
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def label_variable(name: str, label: str, metric: str) -> JSON:
    """A multi-value variable over one label's values, `All` matching everything.

    Queries use it as `{name=~"$name"}`.
    """
    definition = f"label_values({metric}, {name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def row(title: str) -> JSON:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": 0},
        "panels": [],
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    sections: list[tuple[str, list[JSON]]],
    variables: list[JSON],
) -> JSON:
    """A dashboard of titled rows, each filled left to right and wrapped at 24 columns."""
    panels: list[JSON] = []
    y = 0
    for section_title, section in sections:
        heading = row(section_title)
        heading["gridPos"]["y"] = y
        panels.append(heading)
        y += 1
        x, line_height = 0, 0
        for panel in section:
            grid = panel["gridPos"]
            if x + grid["w"] > GRID_COLUMNS:
                x, y, line_height = 0, y + line_height, 0
            grid["x"], grid["y"] = x, y
            x += grid["w"]
            line_height = max(line_height, grid["h"])
            panels.append(panel)
        y += line_height
    for number, panel in enumerate(panels, 1):
        panel["id"] = number
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["switchboard"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "Switchboard dashboards",
                "type": "dashboards",
                "tags": ["switchboard"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": panels,
    }
