"""Draw dashboard panels from a Prometheus run to a PNG, so a reader sees what they show.

    python -m tools.render_panels --prometheus http://127.0.0.1:9090 --minutes 15
    python -m tools.render_panels --demo 150      # start everything, load it, draw

The panels' PromQL is read from the committed dashboards
(deploy/grafana/dashboards/overview.json by default), with Grafana's variables
replaced as Grafana would with everything selected, and run as range queries
over Prometheus' HTTP API. By default the two panels operators live by are
drawn: time to first token p50/p95/p99 by model and the disconnect rate by
reason. `--demo` starts Redis, the upstream SIMULATOR and the four services
(tools/stack.py), a Prometheus scraping them (tools/prometheus_server.py),
drives tools/demo_load.py for the given seconds, and draws that run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.dates as mdates
import matplotlib.pyplot as plt

from tools.dashboards.queries import (
    DASHBOARDS_DIR,
    PanelQuery,
    all_values,
    load_all,
    panel_queries,
    substitute,
)
from tools.prometheus_server import PrometheusClient, PrometheusServer

ROOT = Path(__file__).resolve().parent.parent
KEY_PANELS = (
    "Time to first token (client) p50 / p95 / p99 by model",
    "Disconnect rate by reason",
)
AXIS_LABELS = {"s": "seconds", "cps": "per second", "reqps": "per second", "percentunit": "share"}


@dataclass
class Line:
    label: str
    times: list[datetime]
    values: list[float]


def legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana legend format (`p95 {{model}}`) filled with a series' labels."""
    if template in ("", "__auto"):
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def fetch(
    prometheus: PrometheusClient,
    queries: list[PanelQuery],
    values: dict[str, str],
    start: float,
    end: float,
    step: float,
    rate_interval: str,
) -> list[Line]:
    """Every series of the panel's queries over [start, end]; all-zero series left out."""
    lines = []
    for query in queries:
        expr = substitute(query.expr, values, rate_interval)
        for series in prometheus.query_range(expr, start, end, step):
            points = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN",)]
            if not points or not any(v for _, v in points):
                continue
            lines.append(
                Line(
                    legend(query.legend, series["metric"]),
                    [datetime.fromtimestamp(t) for t, _ in points],
                    [v for _, v in points],
                )
            )
    return lines


def render(
    prometheus: PrometheusClient,
    out: Path,
    start: float,
    end: float,
    *,
    dashboard: str = "overview",
    titles: tuple[str, ...] = KEY_PANELS,
    step: float = 5.0,
    rate_interval: str = "1m",
    note: str = "",
) -> dict[str, int]:
    """Draw the panels titled `titles` to `out` (PNG); the number of lines drawn per panel.

    Raises:
        KeyError: a title is not a panel of the dashboard.
    """
    board = load_all(DASHBOARDS_DIR)[dashboard]
    queries = panel_queries(board)
    values = all_values(board)
    figure, axes = plt.subplots(len(titles), 1, figsize=(11, 3.6 * len(titles)), squeeze=False)
    drawn = {}
    for axis, title in zip(axes[:, 0], titles, strict=True):
        mine = [q for q in queries if q.panel == title]
        if not mine:
            raise KeyError(f"no panel titled {title!r} in {dashboard}")
        lines = fetch(prometheus, mine, values, start, end, step, rate_interval)
        for line in lines:
            axis.plot(line.times, line.values, label=line.label, linewidth=1.4)
        axis.set_title(title, loc="left", fontsize=11)
        axis.set_ylabel(AXIS_LABELS.get(mine[0].unit, mine[0].unit))
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        # matplotlib ships no annotations for DateFormatter.__init__.
        axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
        if lines:
            axis.legend(fontsize=8, loc="upper left", ncol=3)
        else:
            axis.text(0.5, 0.5, "no data", transform=axis.transAxes, ha="center")
        drawn[title] = len(lines)
    if note:
        figure.suptitle(note, fontsize=9, x=0.01, ha="left", color="dimgray")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return drawn


def demo(seconds: float, out: Path) -> dict[str, int]:
    """Start the system and a Prometheus, load it for `seconds`, draw the run."""
    from tools import demo_load
    from tools.stack import Ports, Stack

    ports = Ports.free()
    with demo_load.tenants_dir() as directory:
        stack = Stack(
            ports=ports,
            simulator_args=["--ttft-ms", "120", "--token-delay-ms", "8", "--reply-tokens", "24"],
            extra_env={"SWITCHBOARD_TENANTS_FILE": str(demo_load.write_tenants(directory, ports))},
        )
        targets = {
            "switchboard-gateway": [f"127.0.0.1:{ports.gateway}"],
            "switchboard-session": [f"127.0.0.1:{ports.session_metrics}"],
            "switchboard-broker": [f"127.0.0.1:{ports.broker_metrics}"],
            "switchboard-toolexec": [f"127.0.0.1:{ports.toolexec_metrics}"],
        }
        with stack, PrometheusServer(targets) as prometheus:
            start = time.time()
            asyncio.run(demo_load.run(stack, seconds))
            time.sleep(3)  # the last scrapes
            return render(
                prometheus,
                out,
                start,
                time.time(),
                step=2.0,
                rate_interval="20s",
                note="Load from tools/demo_load.py against the upstream SIMULATOR "
                "(not a real model); Prometheus scraping every 1 s; rates over 20 s.",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", help="base URL of a Prometheus scraping Switchboard")
    source.add_argument("--demo", type=float, metavar="SECONDS", help="run a demo load first")
    parser.add_argument("--minutes", type=float, default=15, help="how far back to draw")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "panels.png")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    args = parser.parse_args()
    if args.demo:
        drawn = demo(args.demo, args.out)
    else:
        end = time.time()
        drawn = render(
            PrometheusClient(args.prometheus),
            args.out,
            end - args.minutes * 60,
            end,
            step=max(args.minutes * 60 / 300, 1.0),
            rate_interval=args.rate_interval,
        )
    for title, count in drawn.items():
        print(f"{title}: {count} lines")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
