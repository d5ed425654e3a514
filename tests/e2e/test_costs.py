"""Cost in money through the real processes: a seeded run of many responses over
both HTTP APIs and the WebSocket, on two gateways; the recorded cost equals what
the upstream's reported usage and the price table give, to the micro-dollar
(`GET /v1/usage`, `python -m switchboard.tenancy usage`, the metric); a money
budget stops its tenant at the limit."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, tenants_file
from tools.stack import ROOT, Ports, Stack

PAYER_KEY, CAPPED_KEY, OTHER_KEY = new_key(), new_key(), new_key()
# USD per million tokens, as micro-dollars per million (what the ledger keeps).
INPUT, CACHED, OUTPUT = 150_000, 75_000, 600_000
BUDGET_USD = 0.0002
TENANTS = f"""
  payer:
    keys: ["{hash_key(PAYER_KEY)}"]
    models: {{gpt-4o-mini: {{}}, gpt-realtime: {{upstream_model: gpt-4o-mini}}}}
  capped:
    keys: ["{hash_key(CAPPED_KEY)}"]
    models: {{gpt-4o-mini: {{}}}}
    money_budget: {{daily_usd: {BUDGET_USD}}}
  other:
    keys: ["{hash_key(OTHER_KEY)}"]
    models: {{gpt-4o-mini: {{}}}}
"""
PRICES = """
prices:
  gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60, as_of: "2026-12-01"}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS, preamble=PRICES)
    with Stack(
        ports=ports,
        replicas=2,
        simulator_args=["--ttft-ms", "5", "--token-delay-ms", "1", "--reply-tokens", "20"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    ) as stack:
        yield stack


def picodollars(usage: dict[str, int]) -> int:
    cached = usage.get("cached", 0)
    return (usage["input"] - cached) * INPUT + cached * CACHED + usage["output"] * OUTPUT


def client(port: int, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)


async def one(kind: str, port: int, text: str) -> dict[str, int]:
    """One response of the payer over `kind`; the usage the client was told."""
    messages: Any = [{"role": "user", "content": text}]
    if kind == "websocket":
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        headers = {"Authorization": f"Bearer {PAYER_KEY}"}
        async with websockets.connect(url, additional_headers=headers) as connection:
            realtime = RealtimeClient(connection)
            await realtime.recv()
            await realtime.say(text)
            usage = (await realtime.respond())[-1]["response"]["usage"]
        cached = usage["input_token_details"]["cached_tokens"]
        return {"input": usage["input_tokens"], "cached": cached, "output": usage["output_tokens"]}
    async with client(port, PAYER_KEY) as sdk:
        if kind == "chat":
            stream = await sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            chat = [chunk async for chunk in stream][-1].usage
            assert chat is not None
            cached = chat.prompt_tokens_details.cached_tokens if chat.prompt_tokens_details else 0
            return {
                "input": chat.prompt_tokens,
                "cached": cached or 0,
                "output": chat.completion_tokens,
            }
        answer = await sdk.responses.create(model="gpt-4o-mini", input=messages)
        assert answer.usage is not None
        return {
            "input": answer.usage.input_tokens,
            "cached": answer.usage.input_tokens_details.cached_tokens,
            "output": answer.usage.output_tokens,
        }


async def usage_report(stack: Stack, key: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{stack.gateway_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}
        ) as reply,
    ):
        assert reply.status == 200
        report: dict[str, Any] = await reply.json()
        return report


async def test_recorded_cost_is_usage_times_prices(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    ports = itertools.cycle(stack.gateway_ports)
    runs = [
        (
            rng.choice(("chat", "responses", "websocket")),
            next(ports),
            f"run {n} "
            + "word " * rng.randrange(1, 40)
            + f'[[sim {{"tokens": {rng.randrange(1, 60)}}}]]',
        )
        for n in range(30)
    ]
    usages = await asyncio.gather(*(one(*run) for run in runs))
    expected = sum(picodollars(usage) for usage in usages)
    report = await usage_report(stack, PAYER_KEY)
    rows = report["data"]
    assert {row["model"] for row in rows} <= {"gpt-4o-mini", "gpt-realtime"}
    assert sum(r["requests"] for r in rows) == 30
    assert sum(r["estimated_requests"] for r in rows) == 0
    assert sum(r["input_tokens"] for r in rows) == sum(u["input"] for u in usages)
    assert sum(r["output_tokens"] for r in rows) == sum(u["output"] for u in usages)
    # To the micro-dollar (the ledger itself is exact, in pico-dollars).
    assert round(report["total_cost_usd"] * 1e6) == round(expected / 1e6)
    # The other tenant sees only its own (nothing).
    assert (await usage_report(stack, OTHER_KEY))["data"] == []
    # The command line reads the same ledger.
    redis_url = stack.redis_url or f"redis://127.0.0.1:{stack.ports.redis}/0"
    env = {**os.environ, "SWITCHBOARD_REDIS_URL": redis_url}
    printed = subprocess.run(
        [sys.executable, "-m", "switchboard.tenancy", "usage", "payer"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"total {expected / 1e12:.6f} USD over 30 responses" in printed
    # The metric, summed over both gateways.
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for port in stack.gateway_ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
                for line in (await reply.text()).splitlines():
                    if line.startswith("switchboard_gateway_cost_usd_total{"):
                        total += float(line.rsplit(" ", 1)[1])
    assert abs(total - expected / 1e12) < 1e-9


async def test_a_money_budget_stops_its_tenant_at_the_limit(stack: Stack) -> None:
    """Many concurrent responses of a tenant with a small daily budget in money,
    over both gateways: some are refused with insufficient_quota, and what was
    spent stays within the budget (each response reserved its largest cost)."""
    ports = itertools.cycle(stack.gateway_ports)

    async def ask(port: int, n: int) -> str:
        async with client(port, CAPPED_KEY) as sdk:
            try:
                await sdk.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"capped {n}"}],
                    max_completion_tokens=30,
                )
            except openai.RateLimitError as error:
                return str(error.code)
            return "ok"

    outcomes = await asyncio.gather(*(ask(next(ports), n) for n in range(20)))
    assert "ok" in outcomes and "insufficient_quota" in outcomes
    assert set(outcomes) == {"ok", "insufficient_quota"}
    spent = (await usage_report(stack, CAPPED_KEY))["total_cost_usd"]
    assert 0 < spent <= BUDGET_USD
    assert (await usage_report(stack, CAPPED_KEY))["budgets"]["daily_usd"] == BUDGET_USD
