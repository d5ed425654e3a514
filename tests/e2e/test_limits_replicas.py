"""Tenant limits hold across two gateway and two broker processes sharing one Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, tenants_file
from tools.stack import Ports, Stack

RATED_KEY, BUDGET_KEY, CROWD_KEY = new_key(), new_key(), new_key()
MAX_OUTPUT = 40
BUDGET = 1500


TENANTS = f"""
  rated:
    keys: ["{hash_key(RATED_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{requests_per_minute: 7, tokens_per_minute: 1000000}}
  budget:
    keys: ["{hash_key(BUDGET_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{max_output_tokens: {MAX_OUTPUT}}}
    daily_token_budget: {BUDGET}
  crowd:
    keys: ["{hash_key(CROWD_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{concurrent_connections: 3}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS)
    with Stack(
        ports=ports,
        replicas=2,
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "2", "--reply-tokens", "30"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    ) as stack:
        yield stack


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"


async def one_response(
    port: int, key: str, text: str, *, rate_limited: bool = False
) -> dict[str, Any]:
    """Open a session on one gateway, ask once; the `response.done` and any error
    (and, for a tenant with per-minute limits, the `rate_limits.updated` after it)."""
    async with websockets.connect(
        url(port), additional_headers={"Authorization": f"Bearer {key}"}
    ) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say(text)
        events = await client.respond()
        if rate_limited:
            events.append(await client.recv())
            events[-2:] = events[-1:] + events[-2:-1]  # keep response.done last
        errors = [e["error"] for e in events if e["type"] == "error"]
        limits = [e for e in events if e["type"] == "rate_limits.updated"]
        done = events[-1]["response"]
        closed = None
        if any(e["code"] == "insufficient_quota" for e in errors):
            # A spent budget is terminal: the gateway ends the connection.
            with pytest.raises(websockets.ConnectionClosed) as ended:
                await asyncio.wait_for(connection.recv(), 10)
            closed = ended.value.rcvd
        return {"done": done, "errors": errors, "limits": limits, "closed": closed}


async def test_requests_per_minute_admit_exactly_the_limit(stack: Stack) -> None:
    ports = itertools.cycle(stack.gateway_ports)
    results = await asyncio.gather(
        *(
            one_response(next(ports), RATED_KEY, f"request {n}", rate_limited=True)
            for n in range(24)
        )
    )
    completed = [r for r in results if r["done"]["status"] == "completed"]
    refused = [r for r in results if r["done"]["status"] == "failed"]
    assert len(completed) == 7
    assert len(refused) == 17
    for result in refused:
        (error,) = result["errors"]
        assert error["code"] == "rate_limit_exceeded"
        assert "7 responses per minute" in error["message"]
    # rate_limits.updated carries the real remaining numbers, never nulls.
    assert all(r["limits"] for r in results)
    remaining = [r["limits"][-1]["rate_limits"] for r in completed]
    for limits in remaining:
        by_name = {limit["name"]: limit for limit in limits}
        assert by_name["requests"]["limit"] == 7
        assert 0 <= by_name["requests"]["remaining"] < 7
        assert by_name["tokens"]["limit"] == 1_000_000
        assert all(value is not None for limit in limits for value in limit.values())


async def test_a_token_budget_is_never_overshot_by_more_than_one_response(stack: Stack) -> None:
    ports = itertools.cycle(stack.gateway_ports)
    results = await asyncio.gather(
        *(
            one_response(next(ports), BUDGET_KEY, f'spend {n} [[sim {{"tokens": 200}}]]')
            # Even one after another these need more than the budget (~52 tokens each).
            for n in range(40)
        )
    )
    served = [r for r in results if r["done"]["status"] != "failed"]
    refused = [r for r in results if r["done"]["status"] == "failed"]
    spent = sum(r["done"]["usage"]["total_tokens"] for r in served)
    assert served, "no response was served"
    assert refused, "the budget never ran out"
    assert spent <= BUDGET + MAX_OUTPUT
    for result in refused:
        assert [e["code"] for e in result["errors"]] == ["insufficient_quota"]
        assert result["closed"].code == 4529
        assert result["closed"].reason == "insufficient_quota"
    # Each served response was capped by the tenant's max_output_tokens.
    assert all(r["done"]["usage"]["output_tokens"] <= MAX_OUTPUT for r in served)


async def test_concurrent_connections_across_gateways(stack: Stack) -> None:
    ports = stack.gateway_ports
    headers = {"Authorization": f"Bearer {CROWD_KEY}"}
    open_connections = [
        await websockets.connect(url(ports[n % 2]), additional_headers=headers) for n in range(3)
    ]
    try:
        for port in ports:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(url(port), additional_headers=headers)
            assert refused.value.response.status_code == 429
            assert int(refused.value.response.headers["retry-after"]) >= 1
        await open_connections[0].close()
        # A freed slot is usable at once, on the other gateway too.
        await asyncio.sleep(0.2)
        again = await websockets.connect(url(ports[1]), additional_headers=headers)
        await again.close()
    finally:
        for connection in open_connections:
            await connection.close()
