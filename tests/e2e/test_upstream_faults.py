"""Upstream faults through the whole system: every response completes or ends with a clear error.

Real processes: Redis, two upstream SIMULATORS (`tools.simulator`, not models),
session, toolexec, broker and gateway, started by `tools.stack`. The tenants
file gives the broker four upstreams on the two simulators:

    primary   -> simulator 1              secondary -> simulator 2
                 (their breakers stay closed: the mixed load would open them)
    flaky     -> simulator 1, its breaker opens after 2 failures for 1 s
    narrow    -> simulator 2, one call at a time, two waiting per tenant

and both tenants these models:

    gpt-realtime -> primary, then secondary     guarded -> flaky, then secondary
    solo         -> primary only                guarded-solo -> flaky only
    narrow       -> narrow

Faults come from the simulators' directives and `/_sim/config`; what happened
is read from the simulators' observation logs and the broker's /metrics.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, assert_no_secret_leaks, reply_text
from tools.redis_server import free_port
from tools.stack import Ports, Stack

pytestmark = pytest.mark.e2e

ALPHA_KEY, BETA_KEY = new_key(), new_key()
MODELS = """
      gpt-realtime:
        deployments: [{upstream: primary}, {upstream: secondary, priority: 1}]
      solo: {upstream: primary}
      guarded:
        deployments: [{upstream: flaky}, {upstream: secondary, priority: 1}]
      guarded-solo: {upstream: flaky}
      narrow: {upstream: narrow}"""
TENANTS = """
upstreams:
  primary:
    base_url: "http://127.0.0.1:{one}/v1"
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
    circuit_breaker: {{failures: 1000}}
  secondary:
    base_url: "http://127.0.0.1:{two}/v1"
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
    circuit_breaker: {{failures: 1000}}
  flaky:
    base_url: "http://127.0.0.1:{one}/v1"
    circuit_breaker: {{failures: 2, cooldown_s: 1}}
  narrow:
    base_url: "http://127.0.0.1:{two}/v1"
    admission: {{max_concurrent: 1, max_queued_per_tenant: 2, queue_timeout_s: 30}}
tenants:
  alpha:
    keys: ["{alpha}"]
    models:{models}
  beta:
    keys: ["{beta}"]
    models:{models}
"""
# Known, specific endings of a response the upstream failed.
FAULT_CODES = {"upstream_error", "upstream_rate_limited", "upstream_stream_broken"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports, second = Ports.free(), free_port()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(
        TENANTS.format(
            one=ports.simulator,
            two=second,
            alpha=hash_key(ALPHA_KEY),
            beta=hash_key(BETA_KEY),
            models=MODELS,
        )
    )
    stack = Stack(
        ports=ports,
        extra_simulator_ports=[second],
        simulator_args=["--ttft-ms", "10", "--token-delay-ms", "2", "--reply-tokens", "8"],
        extra_env={
            "SWITCHBOARD_TENANTS_FILE": str(tenants),
            # Short backoffs keep the suite quick; the policy is otherwise the default.
            "SWITCHBOARD_BROKER_RETRY_BACKOFF_S": "0.05",
        },
    )
    with stack:
        yield stack
    assert_no_secret_leaks(stack)


class Simulator:
    """One simulator's control endpoints (`/_sim/config`, `/_sim/streams`)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def configure(self, overrides: dict[str, Any]) -> None:
        async with self.http.post(f"{self.url}/_sim/config", json=overrides) as reply:
            assert reply.status == 200, await reply.text()

    async def streams(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/_sim/streams") as reply:
            body: dict[str, list[dict[str, Any]]] = orjson.loads(await reply.read())
            return body["streams"]

    async def clear(self) -> None:
        async with self.http.delete(f"{self.url}/_sim/streams") as reply:
            assert reply.status == 200


@pytest.fixture
async def sims(stack: Stack) -> AsyncIterator[tuple[Simulator, Simulator]]:
    async with aiohttp.ClientSession() as http:
        one = Simulator(http, stack.simulator_url)
        two = Simulator(http, f"http://127.0.0.1:{stack.extra_simulator_ports[0]}")
        for sim in (one, two):
            await sim.configure({})
            await sim.clear()
        try:
            yield one, two
        finally:
            for sim in (one, two):
                await sim.configure({})


@asynccontextmanager
async def session(stack: Stack, model: str, key: str = ALPHA_KEY) -> AsyncIterator[RealtimeClient]:
    async with websockets.connect(
        f"{stack.websocket_url}?model={model}",
        additional_headers={"Authorization": f"Bearer {key}"},
    ) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        assert created["type"] == "session.created"
        yield client


async def ask(stack: Stack, model: str, text: str, key: str = ALPHA_KEY) -> list[dict[str, Any]]:
    """One turn on a new connection: every event up to `response.done`."""
    async with session(stack, model, key) as client:
        await client.say(text)
        return await client.respond()


def done(events: list[dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = events[-1]["response"]
    return response


def error_codes(events: list[dict[str, Any]]) -> list[str]:
    return [e["error"]["code"] for e in events if e["type"] == "error"]


async def broker_metrics(stack: Stack) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{stack.ports.broker_metrics}/metrics") as reply,
    ):
        return await reply.text()


def sample(text: str, name: str, **labels: str) -> float:
    rendered = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    match = re.search(rf"^{re.escape(f'{name}{{{rendered}}}')} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def metric(stack: Stack, name: str, **labels: str) -> float:
    return sample(await broker_metrics(stack), name, **labels)


# ----------------------------------------------------------- retries, failover


async def test_a_429_with_retry_after_is_waited_out_then_completes(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    one, _ = sims
    events = await ask(
        stack, "solo", 'hi [[sim {"status": 429, "retry_after": 0.5, "fail_times": 1}]]'
    )
    assert done(events)["status"] == "completed"
    assert reply_text(events).startswith('turn 1: you said "hi"')
    first, second = await one.streams()
    assert (first["outcome"], second["outcome"]) == ("failed_status", "completed")
    assert second["started_at"] - first["ended_at"] >= 0.5


async def test_a_5xx_deployment_fails_over_to_the_next(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    one, two = sims
    await one.configure({"status": 503})
    before = await metric(
        stack,
        "switchboard_broker_upstream_retries_total",
        upstream="primary",
        reason="server_error",
    )
    events = await ask(stack, "gpt-realtime", "hello")
    assert done(events)["status"] == "completed"
    assert [r["outcome"] for r in await one.streams()] == ["failed_status"]
    assert [r["outcome"] for r in await two.streams()] == ["completed"]
    after = await metric(
        stack,
        "switchboard_broker_upstream_retries_total",
        upstream="primary",
        reason="server_error",
    )
    assert after == before + 1


async def test_a_stream_cut_before_its_first_token_is_served_elsewhere(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    one, two = sims
    await one.configure({"disconnect_after": 0})
    events = await ask(stack, "gpt-realtime", "cut early")
    assert done(events)["status"] == "completed"
    assert reply_text(events).startswith('turn 1: you said "cut early"')
    assert [r["outcome"] for r in await one.streams()] == ["sim_disconnected"]
    assert [r["outcome"] for r in await two.streams()] == ["completed"]


async def test_a_stream_cut_after_its_first_token_fails_the_response_clearly(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    one, two = sims
    events = await ask(stack, "gpt-realtime", 'cut late [[sim {"disconnect_after": 3}]]')
    response = done(events)
    assert response["status"] == "failed"
    assert response["status_details"]["error"]["code"] == "upstream_stream_broken"
    assert error_codes(events) == ["upstream_stream_broken"]
    # The text that did arrive is kept, marked incomplete: never a silent truncation.
    text = reply_text(events)
    assert text and 'turn 1: you said "cut late"'.startswith(text)
    (item,) = response["output"]
    assert item["status"] == "incomplete"
    # Not retried: the client had the first tokens already.
    assert [r["outcome"] for r in await one.streams()] == ["sim_disconnected"]
    assert await two.streams() == []


async def test_a_retry_after_beyond_the_deadline_ends_the_response_at_once(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    events = await ask(stack, "solo", 'later [[sim {"status": 429, "retry_after": 120}]]')
    response = done(events)
    assert response["status"] == "failed"
    assert error_codes(events) == ["upstream_rate_limited"]
    assert "retry after 120 s" in response["status_details"]["error"]["message"]
    assert len(await sims[0].streams()) == 1


# ------------------------------------------------------------- circuit breaker


async def test_the_circuit_breaker_opens_and_closes_as_documented(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    one, _ = sims
    state = "switchboard_broker_circuit_breaker_state"
    transitions = "switchboard_broker_circuit_breaker_transitions_total"
    opened = await metric(stack, transitions, upstream="flaky", state="open")
    await one.configure({"status": 500})
    for turn in range(2):  # two failures in a row open `flaky`; secondary answers
        events = await ask(stack, "guarded", f"turn {turn}")
        assert done(events)["status"] == "completed"
    assert await metric(stack, state, upstream="flaky", state="open") == 1
    assert await metric(stack, transitions, upstream="flaky", state="open") == opened + 1

    # Open: flaky is skipped without a request, and a model with no other
    # deployment fails at once with a specific error.
    await one.clear()
    events = await ask(stack, "guarded", "skipped")
    assert done(events)["status"] == "completed"
    events = await ask(stack, "guarded-solo", "nowhere to go")
    assert done(events)["status"] == "failed"
    assert error_codes(events) == ["upstream_error"]
    assert "circuit breaker is open" in done(events)["status_details"]["error"]["message"]
    assert await one.streams() == []

    # After the 1 s cooldown one probe goes through; its success closes the breaker.
    await one.configure({})
    await asyncio.sleep(1.1)
    events = await ask(stack, "guarded", "probe")
    assert done(events)["status"] == "completed"
    assert [r["outcome"] for r in await one.streams()] == ["completed"]
    text = await broker_metrics(stack)
    assert sample(text, state, upstream="flaky", state="closed") == 1
    assert sample(text, transitions, upstream="flaky", state="half_open") >= 1
    assert sample(text, transitions, upstream="flaky", state="closed") >= 1


# ------------------------------------------------------------ admission control


async def test_a_burst_from_one_tenant_does_not_starve_another(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    _, two = sims
    queued = "switchboard_broker_admission_queued_requests"
    running = "switchboard_broker_admission_running_requests"
    slow = '[[sim {"tokens": 30, "token_delay_ms": 60}]]'
    tasks: list[asyncio.Task[list[dict[str, Any]]]] = []

    async def start(text: str, key: str, waiting: int) -> None:
        tasks.append(asyncio.create_task(ask(stack, "narrow", f"{text} {slow}", key)))
        for _ in range(200):
            metrics = await broker_metrics(stack)
            if (
                sample(metrics, running, upstream="narrow"),
                sample(metrics, queued, upstream="narrow"),
            ) == (1, waiting):
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{text} did not reach the broker's queue")

    await start("alpha one", ALPHA_KEY, 0)
    await start("alpha two", ALPHA_KEY, 1)
    await start("alpha three", ALPHA_KEY, 2)
    # alpha's queue is full: its next response is refused at once with server_busy ...
    refused = await ask(stack, "narrow", f"alpha four {slow}")
    assert done(refused)["status"] == "failed"
    assert error_codes(refused) == ["server_busy"]
    assert done(refused)["status_details"]["error"]["code"] == "server_busy"
    # ... while beta's is admitted, and served before alpha's last.
    await start("beta one", BETA_KEY, 3)
    results = await asyncio.gather(*tasks)
    assert [done(events)["status"] for events in results] == ["completed"] * 4
    served = [r["last_user"] for r in await two.streams() if r["outcome"] == "completed"]
    assert served == ["alpha one", "alpha two", "beta one", "alpha three"]


# ------------------------------------------------------------------ mixed load


async def test_under_mixed_faults_every_response_completes_or_fails_clearly(
    stack: Stack, sims: tuple[Simulator, Simulator]
) -> None:
    faults = [
        "",
        '[[sim {"status": 429, "retry_after": 0.2, "fail_times": 1}]]',
        '[[sim {"status": 503, "fail_times": 1}]]',
        '[[sim {"status": 500}]]',
        '[[sim {"disconnect_after": 0, "tokens": 6}]]',
        '[[sim {"disconnect_after": 4}]]',
    ]
    rng = random.Random(5)
    plan = [
        (f"load {n}", rng.choice(faults), rng.choice(["gpt-realtime", "solo"])) for n in range(24)
    ]

    async def one_turn(text: str, fault: str, model: str) -> tuple[str, list[dict[str, Any]]]:
        return fault, await asyncio.wait_for(ask(stack, model, f"{text} {fault}"), 60)

    results = await asyncio.gather(*(one_turn(*turn) for turn in plan))
    for fault, events in results:
        response = done(events)
        if response["status"] == "completed":
            assert reply_text(events), fault
            continue
        assert response["status"] == "failed", (fault, response)
        code = response["status_details"]["error"]["code"]
        assert code in FAULT_CODES, (fault, code)
        assert error_codes(events) == [code]
    statuses = {
        fault: {done(e)["status"] for f, e in results if f == fault} for fault, _ in results
    }
    # Faults that clear after one attempt are retried into completions.
    for fault in faults[:3]:
        assert statuses.get(fault, {"completed"}) == {"completed"}, fault
