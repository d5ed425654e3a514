"""Cancel versus disconnect, measured where the upstream sees it (the simulator).

`response.cancel` closes the upstream stream at once; a client that just leaves
does not: its response runs on, recorded, for the disconnect grace (here 1.5 s),
and only then is the upstream stream closed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import RealtimeClient, connect
from tools.stack import Ports, Stack

GRACE_S = 1.5
LONG = '[[sim {"tokens": 3000, "token_delay_ms": 10}]]'


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(
        ports=Ports.free(),
        extra_env={"SWITCHBOARD_GATEWAY_DISCONNECT_GRACE_S": str(GRACE_S)},
    )
    with stack:
        yield stack


async def stream_of(stack: Stack, marker: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.simulator_url}/_sim/streams") as reply,
    ):
        streams = (await reply.json())["streams"]
    stream: dict[str, Any] = next(s for s in reversed(streams) if marker in s["last_user"])
    return stream


async def ended(stack: Stack, marker: str, timeout_s: float = 10) -> dict[str, Any]:
    """The stream once the simulator saw it end (it notes the time it did)."""
    deadline = time.monotonic() + timeout_s
    while (stream := await stream_of(stack, marker))["outcome"] == "in_progress":
        assert time.monotonic() < deadline, stream
        await asyncio.sleep(0.05)
    return stream


async def start_long_response(client: RealtimeClient, marker: str) -> str:
    await client.say(f"{marker} {LONG}")
    await client.send({"type": "response.create"})
    deltas = 0
    response_id = ""
    while deltas < 5:
        event = await client.recv()
        if event["type"] == "response.created":
            response_id = event["response"]["id"]
        deltas += event["type"] == "response.output_text.delta"
    return response_id


async def test_cancel_closes_the_upstream_stream_within_100_ms(stack: Stack) -> None:
    delays = []
    for attempt in range(5):
        marker = f"cancel me {attempt}"
        async with connect(stack) as connection:
            client = RealtimeClient(connection)
            await client.recv()
            await start_long_response(client, marker)
            cancelled_at = time.time()
            await client.send({"type": "response.cancel"})
            done = (await client.recv_until("response.done"))[-1]["response"]
            assert done["status"] == "cancelled"
            assert done["status_details"]["reason"] == "client_cancelled"
            assert done["usage"]["output_tokens"] > 0
        stream = await ended(stack, marker)
        assert stream["outcome"] == "client_closed"
        delays.append(stream["ended_at"] - cancelled_at)
    print(f"upstream closed after response.cancel: {[round(d * 1000) for d in delays]} ms")
    assert statistics.median(delays) < 0.1, delays


async def test_a_client_that_leaves_keeps_its_response_for_the_grace_only(
    stack: Stack,
) -> None:
    marker = "leave me"
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        session_id = (await client.recv())["session"]["id"]
        await start_long_response(client, marker)
        left_at = time.time()
        connection.transport.abort()
    await asyncio.sleep(GRACE_S / 2)
    assert (await stream_of(stack, marker))["outcome"] == "in_progress"
    stream = await ended(stack, marker)
    assert stream["outcome"] == "client_closed"
    print(f"upstream closed {stream['ended_at'] - left_at:.2f} s after the client left")
    assert GRACE_S <= stream["ended_at"] - left_at < GRACE_S + 2
    # What ran during the grace was recorded: a resume sees the response end.
    async with aiohttp.ClientSession() as http:
        url = f"{stack.websocket_url}?model=gpt-realtime&session_id={session_id}"
        async with http.ws_connect(
            url, headers={"Authorization": f"Bearer {stack.dev_key}"}
        ) as resumed:
            events = []
            while not events or events[-1]["type"] != "response.done":
                events.append(await resumed.receive_json(timeout=10))
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "client_disconnected"
