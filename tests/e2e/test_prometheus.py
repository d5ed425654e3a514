"""A real Prometheus scrapes the running system through a mixed load; every
dashboard panel query and every rule expression then runs against it.

The load (run twice, so that every series it touches exists before the second
run and its rates are not zero): text turns on two models, one slow first
token, a server-side tool call and an unknown one, a lookup of a missing item,
a cancel, a client that hangs up mid-response, a refused key, a request over a
tenant's rate limit, an upstream 500 that a retry gets past, and an upstream
call that fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.deploy.test_alerts import ALERTS, rules
from tests.e2e.conftest import RealtimeClient, assert_no_secret_leaks, tenants_file
from tools.dashboards.queries import (
    all_values,
    label_values_query,
    load_all,
    panel_queries,
    substitute,
)
from tools.prometheus_server import PrometheusServer
from tools.render_panels import KEY_PANELS, render
from tools.stack import Ports, Stack

ACME_KEY, RATED_KEY = new_key(), new_key()
MODELS = ("gpt-realtime", "gpt-realtime-mini")
TENANTS = f"""
  acme:
    keys: ["{hash_key(ACME_KEY)}"]
    tier: standard
    models: {{gpt-realtime: {{upstream: default}}, gpt-realtime-mini: {{upstream: default}}}}
    builtins: [calculate]
  rated:
    keys: ["{hash_key(RATED_KEY)}"]
    tier: free
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{requests_per_minute: 1}}
"""
# Prices of the models the load uses: the cost panels have something to show.
PRICES = """
prices:
  gpt-realtime: {input: 4.00, cached_input: 0.40, output: 16.00}
  gpt-realtime-mini: {input: 0.60, output: 2.40}
"""
# Grafana's rate window, wide enough to hold the whole load.
RATE_INTERVAL = "2m"

# Panel queries that may rightly return nothing after this load; every other
# panel query must return at least one finite value.
MAY_BE_EMPTY = {
    ("Session store: Redis errors", "A"): "Redis never failed",
    ("Admission rejections (server_busy)", "A"): "no upstream was saturated",
}


@dataclass
class Observed:
    stack: Stack
    prometheus: PrometheusServer
    # When the load started and when it had been scraped.
    started: float
    at: float


def targets(ports: Ports) -> dict[str, list[str]]:
    return {
        "switchboard-gateway": [f"127.0.0.1:{ports.gateway}"],
        "switchboard-session": [f"127.0.0.1:{ports.session_metrics}"],
        "switchboard-broker": [f"127.0.0.1:{ports.broker_metrics}"],
        "switchboard-toolexec": [f"127.0.0.1:{ports.toolexec_metrics}"],
    }


@asynccontextmanager
async def realtime(stack: Stack, key: str, model: str) -> AsyncIterator[RealtimeClient]:
    url = f"{stack.websocket_url}?model={model}"
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(url, additional_headers=headers) as connection:
        client = RealtimeClient(connection)
        assert (await client.recv())["type"] == "session.created"
        yield client


async def turn(client: RealtimeClient, text: str) -> dict[str, Any]:
    await client.say(text)
    return (await client.respond())[-1]["response"]


def directive(**fields: Any) -> str:
    return f"[[sim {json.dumps(fields)}]]"


async def drive(stack: Stack, run: int) -> None:
    """One round of the mixed load; `run` keeps the simulator's request keys apart."""
    async with realtime(stack, ACME_KEY, "gpt-realtime") as client:
        for n in range(3):
            assert (await turn(client, f"run {run} hello {n}"))["status"] == "completed"
        slow = await turn(client, f"run {run} slow {directive(ttft_ms=1100)}")
        assert slow["status"] == "completed"
        for name in ("calculate", "teleport"):
            calls = directive(tool_calls=[{"name": name, "arguments": {"expression": "2+2"}}])
            await client.say(f"run {run} tool {calls}")
            await client.send({"type": "response.create"})
            await client.recv_until("response.done", timeout_s=30)
            await client.recv_until("response.done", timeout_s=30)
        await client.send({"type": "conversation.item.retrieve", "item_id": "item_nope"})
        assert (await client.recv_until("error"))[-1]["error"]["code"] == "item_not_found"
        long = directive(tokens=400, token_delay_ms=50)
        await client.say(f"run {run} long story {long}")
        await client.send({"type": "response.create"})
        await client.recv_until("response.output_text.delta")
        await client.send({"type": "response.cancel"})
        done = (await client.recv_until("response.done"))[-1]["response"]
        assert done["status"] == "cancelled"
        retried = await turn(client, f"run {run} flaky {directive(status=500, fail_times=1)}")
        assert retried["status"] == "completed"
        failed = await turn(client, f"run {run} broken {directive(status=400)}")
        assert failed["status"] == "failed"
    async with realtime(stack, ACME_KEY, "gpt-realtime-mini") as client:
        for n in range(2):
            assert (await turn(client, f"run {run} mini {n}"))["status"] == "completed"
    async with realtime(stack, RATED_KEY, "gpt-realtime") as client:
        outcomes = [(await turn(client, f"run {run} rated {n}"))["status"] for n in range(2)]
        assert "failed" in outcomes  # one response a minute: the second is refused
    async with realtime(stack, ACME_KEY, "gpt-realtime") as client:
        # Hang up while the reply streams: client_closed, mid-response.
        await client.say(f"run {run} hang up {directive(tokens=60, token_delay_ms=20)}")
        await client.send({"type": "response.create"})
        await client.recv_until("response.output_text.delta")
    with pytest.raises(websockets.InvalidStatus):
        async with realtime(stack, "sk-sb-not-a-key-at-all-000000", "gpt-realtime"):
            pass


def scraped_total(prometheus: PrometheusServer) -> float:
    samples = prometheus.query("sum(switchboard_gateway_responses_total)")
    return float(samples[0]["value"][1]) if samples else -1.0


async def settle(stack: Stack, prometheus: PrometheusServer) -> None:
    """Wait until Prometheus has scraped what the gateway counts now, then two more scrapes."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:
            # A hung-up response ends a moment after its client is gone.
            await asyncio.sleep(0.5)
            async with http.get(f"{stack.gateway_url}/metrics") as reply:
                text = await reply.text()
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("switchboard_gateway_responses_total{")
            )
            seen = await asyncio.to_thread(scraped_total, prometheus)
            if seen == total:
                break
            assert time.monotonic() < deadline, f"prometheus saw {seen} responses, not {total}"
    await asyncio.sleep(2.5)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS, preamble=PRICES)
    stack = Stack(
        ports=ports,
        simulator_args=["--ttft-ms", "30", "--token-delay-ms", "5", "--reply-tokens", "12"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    )
    with stack, PrometheusServer(targets(ports), rule_files=[ALERTS]) as prometheus:

        async def load() -> None:
            for run in (1, 2):
                await drive(stack, run)
                await settle(stack, prometheus)

        started = time.time()
        asyncio.run(load())
        yield Observed(stack, prometheus, started, time.time())
    assert_no_secret_leaks(stack)


def finite(samples: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in samples)


@pytest.mark.timeout(300)
def test_every_panel_query_runs_and_has_data_after_the_load(observed: Observed) -> None:
    dashboards = load_all()
    empty, errors, checked = [], [], 0
    known = {(q.panel, q.ref_id) for d in dashboards.values() for q in panel_queries(d)}
    assert set(MAY_BE_EMPTY) <= known, "MAY_BE_EMPTY names panels that no longer exist"
    for dashboard in dashboards.values():
        for query in panel_queries(dashboard):
            expr = substitute(query.expr, all_values(dashboard), RATE_INTERVAL)
            checked += 1
            try:
                samples = observed.prometheus.query(expr, at=observed.at)
            except Exception as exc:
                errors.append(f"{query.dashboard} / {query.panel} {query.ref_id}: {exc}")
                continue
            if not finite(samples) and (query.panel, query.ref_id) not in MAY_BE_EMPTY:
                empty.append(f"{query.dashboard} / {query.panel} {query.ref_id}: {expr}")
    assert not errors, "\n".join(errors)
    assert not empty, "no data:\n" + "\n".join(empty)
    assert checked >= 60


def test_the_variables_list_what_the_load_used(observed: Observed) -> None:
    expected = {"model": set(MODELS), "upstream": {"default"}, "tool": {"calculate"}}
    for dashboard in load_all().values():
        for variable in dashboard["templating"]["list"][1:]:
            metric, label = label_values_query(variable)
            values = observed.prometheus.api(f"label/{label}/values", **{"match[]": metric})
            assert expected[variable["name"]] <= set(values), (dashboard["uid"], values)


def test_prometheus_loaded_every_rule_and_evaluates_it_cleanly(observed: Observed) -> None:
    groups = observed.prometheus.api("rules")["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules())
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_every_rule_expression_runs_and_recording_rules_have_data(observed: Observed) -> None:
    for rule in rules():
        samples = observed.prometheus.query(rule["expr"], at=observed.at)
        if "record" in rule and not rule["record"].endswith("6h"):
            assert finite(samples), rule["record"]
    # A recording rule's own series, as Prometheus stored it.
    slow = observed.prometheus.query("switchboard:gateway_ttft_slow:ratio_rate5m")
    by_model = {s["metric"]["model"]: float(s["value"][1]) for s in slow}
    assert set(by_model) == set(MODELS)
    assert 0 < by_model["gpt-realtime"] < 1  # one slow first token among many fast ones
    assert by_model["gpt-realtime-mini"] == 0


def test_a_failing_upstream_puts_its_alert_in_pending(observed: Observed) -> None:
    # One failed call in about ten is over the 5% of SwitchboardUpstreamErrors,
    # which then waits its 5 minutes in `pending`.
    alerts = observed.prometheus.api("alerts")["alerts"]
    pending = {(a["labels"]["alertname"], a["labels"].get("upstream")): a for a in alerts}
    assert ("SwitchboardUpstreamErrors", "default") in pending, alerts
    assert pending[("SwitchboardUpstreamErrors", "default")]["state"] == "pending"
    firing = [a for a in alerts if a["state"] == "firing"]
    assert not firing, firing


def test_tenants_reach_metrics_only_as_their_tier(observed: Observed) -> None:
    series = observed.prometheus.api("series", **{"match[]": '{__name__=~"switchboard_.+"}'})
    values = {value for labels in series for value in labels.values()}
    assert {"standard", "free"} <= values
    assert not values & {"acme", "rated", ACME_KEY, RATED_KEY}


def test_the_key_panels_render_to_a_png(observed: Observed, tmp_path: Path) -> None:
    out = tmp_path / "panels.png"
    drawn = render(
        observed.prometheus, out, observed.started, observed.at, step=1, rate_interval="10s"
    )
    ttft, disconnects = KEY_PANELS
    assert drawn[ttft] == 6  # p50, p95 and p99 of each model
    assert drawn[disconnects] >= 2  # client_closed and auth at least; all-zero reasons left out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
