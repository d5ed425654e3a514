"""The gateway's /metrics reflect what clients went through."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
import websockets

from tests.e2e.conftest import RealtimeClient, connect
from tools.stack import Stack


async def scrape(stack: Stack) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.gateway_url}/metrics") as reply,
    ):
        assert reply.status == 200
        return await reply.text()


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_ttft_tokens_and_disconnects_are_counted(stack: Stack) -> None:
    before = await scrape(stack)
    ttft = 'switchboard_gateway_time_to_first_token_seconds_count{model="other"}'
    done = 'switchboard_gateway_responses_total{model="other",status="completed"}'
    closed = 'switchboard_gateway_disconnects_total{reason="client_closed"}'
    auth = 'switchboard_gateway_disconnects_total{reason="auth"}'
    output = 'switchboard_gateway_tokens_total{direction="output",model="other"}'
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say("count me")
        usage = (await client.respond())[-1]["response"]["usage"]
    with pytest.raises(websockets.InvalidStatus):
        async with connect(stack, key="sk-sb-not-a-key"):
            pass
    after = await scrape(stack)
    for _ in range(50):  # the gateway counts the close once it has processed it
        if value(after, closed) > value(before, closed):
            break
        await asyncio.sleep(0.05)
        after = await scrape(stack)
    assert value(after, ttft) == value(before, ttft) + 1
    assert value(after, done) == value(before, done) + 1
    assert value(after, output) == value(before, output) + usage["output_tokens"]
    assert value(after, closed) >= value(before, closed) + 1
    assert value(after, auth) == value(before, auth) + 1
    assert "switchboard_gateway_connections_active " in after


async def test_the_broker_counts_upstream_calls(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports.broker_metrics}/metrics"

    async def broker_metrics() -> str:
        async with aiohttp.ClientSession() as http, http.get(url) as reply:
            assert reply.status == 200
            return await reply.text()

    completed = 'switchboard_broker_upstream_requests_total{outcome="completed",upstream="default"}'
    ttft = 'switchboard_broker_upstream_time_to_first_token_seconds_count{upstream="default"}'
    before = await broker_metrics()
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say("count me upstream")
        await client.respond()
    after = await broker_metrics()
    assert value(after, completed) == value(before, completed) + 1
    assert value(after, ttft) == value(before, ttft) + 1
    assert "switchboard_broker_streams_active 0.0" in after


async def test_toolexec_counts_calls_by_tool_and_outcome(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports.toolexec_metrics}/metrics"

    async def toolexec_metrics() -> str:
        async with aiohttp.ClientSession() as http, http.get(url) as reply:
            return await reply.text()

    ok = 'switchboard_toolexec_calls_total{outcome="ok",tool="calculate"}'
    unknown = 'switchboard_toolexec_calls_total{outcome="unknown_tool",tool="unknown"}'
    before = await toolexec_metrics()
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        for name, arguments in (("calculate", '{"expression": "1+1"}'), ("teleport", "{}")):
            directive = (
                f'[[sim {{"tool_calls": [{{"name": "{name}", "arguments": {arguments}}}]}}]]'
            )
            await client.say(f"call {directive}")
            await client.send({"type": "response.create"})
            await client.recv_until("response.done", timeout_s=30)
            await client.recv_until("response.done", timeout_s=30)
    after = await toolexec_metrics()
    assert value(after, ok) == value(before, ok) + 1
    assert value(after, unknown) == value(before, unknown) + 1
    assert "teleport" not in after  # model-invented names never become labels
