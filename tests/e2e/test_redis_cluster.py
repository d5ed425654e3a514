"""The whole system on a 3-node Redis Cluster: sessions, client secrets, tool-call
idempotency and tenant limits across two gateway and two broker processes."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import pytest
import websockets
from openai import AsyncOpenAI

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tests.e2e.test_limits_replicas import BUDGET, MAX_OUTPUT, one_response
from tools.stack import Ports, Stack

KEY, BURST_KEY, BUDGET_KEY = new_key(), new_key(), new_key()


TENANTS = f"""
  clustered:
    keys: ["{hash_key(KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    builtins: [calculate]
  burst:
    keys: ["{hash_key(BURST_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{requests_per_minute: 7}}
  budget:
    keys: ["{hash_key(BUDGET_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{max_output_tokens: {MAX_OUTPUT}}}
    daily_token_budget: {BUDGET}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS)
    with Stack(
        ports=ports,
        replicas=2,
        redis_cluster=True,
        simulator_args=["--ttft-ms", "10", "--token-delay-ms", "1", "--reply-tokens", "12"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    ) as stack:
        yield stack


async def test_a_conversation_and_a_server_tool_on_the_cluster(stack: Stack) -> None:
    minting = AsyncOpenAI(api_key=KEY, base_url=f"{stack.gateway_url}/v1")
    secret = await minting.realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime"}
    )
    await minting.close()
    async with websockets.connect(
        f"ws://127.0.0.1:{stack.gateway_ports[1]}/v1/realtime?model=gpt-realtime",
        subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"],  # type: ignore[list-item]
    ) as connection:
        client = RealtimeClient(connection)
        session_id = (await client.recv())["session"]["id"]
        await client.say("first")
        call = {"name": "calculate", "arguments": {"expression": "3*3"}}
        await client.say(f"then compute [[sim {json.dumps({'tool_calls': [call]})}]]")
        await client.send({"type": "response.create"})
        events = await client.recv_until("response.done", timeout_s=30)
        events += await client.recv_until("response.done", timeout_s=30)
        assert reply_text(events).startswith('tool calculate returned {"result":9}')
        await client.say("last")
        last = await client.respond()
        final = reply_text(last)
        assert final.startswith('turn 3: you said "last"; earlier: "first" | "then compute"')
    # The event log lives on the cluster too: the other gateway replays it whole.
    async with websockets.connect(
        f"ws://127.0.0.1:{stack.gateway_ports[0]}/v1/realtime?model=gpt-realtime"
        f"&session_id={session_id}",
        subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"],  # type: ignore[list-item]
    ) as connection:
        client = RealtimeClient(connection)
        await client.send({"type": "conversation.item.retrieve", "item_id": "end_of_replay"})
        replayed = await client.recv_until("error")
    assert replayed[0]["type"] == "session.created"
    assert replayed[-1]["error"]["code"] == "item_not_found"
    assert replayed[-1 - len(last) : -1] == last


async def test_requests_per_minute_are_exact_on_the_cluster(stack: Stack) -> None:
    ports = itertools.cycle(stack.gateway_ports)
    results = await asyncio.gather(
        *(one_response(next(ports), BURST_KEY, f"burst {n}", rate_limited=True) for n in range(20))
    )
    statuses = [r["done"]["status"] for r in results]
    assert statuses.count("completed") == 7
    assert statuses.count("failed") == 13


async def test_a_token_budget_holds_on_the_cluster(stack: Stack) -> None:
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
    assert served
    assert refused
    assert sum(r["done"]["usage"]["total_tokens"] for r in served) <= BUDGET + MAX_OUTPUT
    assert all(r["closed"].code == 4529 for r in refused)
