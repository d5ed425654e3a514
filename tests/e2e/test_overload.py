"""Load shedding: a gateway whose event loop runs late refuses new work with
`server_busy` and goes on with the work it has (gateway/overload.py).

The overload is made for real: the gateway process is stopped (SIGSTOP) for
most of a second, so when it runs again its loop is that late. A stopped
process is what a saturated core looks like to the loop, only on cue.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from tools.stack import Ports, Stack

LIMIT_MS = 100


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(
        ports=Ports.free(),
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "30"],
        extra_env={"SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS": str(LIMIT_MS)},
    )
    with stack:
        yield stack


async def lag_s(http: aiohttp.ClientSession, stack: Stack) -> float:
    async with http.get(f"{stack.gateway_url}/metrics") as answer:
        text = await answer.text()
    for line in text.splitlines():
        if line.startswith("switchboard_gateway_event_loop_lag_seconds "):
            return float(line.split()[1])
    raise AssertionError("no event loop lag metric")


async def stall(stack: Stack, seconds: float) -> None:
    """Stop the gateway process for `seconds`: its loop runs that late after."""
    pid = stack.services["gateway"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


async def until_overloaded(http: aiohttp.ClientSession, stack: Stack) -> None:
    """Until the gateway has measured its stall (its sampler may run just after
    the first request it serves)."""
    for _ in range(20):
        if await lag_s(http, stack) > LIMIT_MS / 1000:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway did not measure its stall")


async def until_recovered(http: aiohttp.ClientSession, stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while await lag_s(http, stack) > LIMIT_MS / 1000 / 2:
        assert time.monotonic() < deadline, "the gateway's loop lag never came down"
        await asyncio.sleep(0.2)


async def events_until(ws: Any, *types: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        event = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        events.append(event)
        if event["type"] in types:
            return events


async def say(ws: Any, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await ws.send(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
    await events_until(ws, "conversation.item.done")


async def ask(ws: Any, event_id: str) -> list[dict[str, Any]]:
    await ws.send(orjson.dumps({"type": "response.create", "event_id": event_id}).decode())
    return await events_until(ws, "response.done", "error")


async def test_an_overloaded_gateway_refuses_new_work_and_recovers(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.dev_key}"}
    async with aiohttp.ClientSession() as http:
        async with websockets.connect(
            f"{stack.websocket_url}?model=gpt-realtime", additional_headers=headers
        ) as ws:
            await events_until(ws, "session.created")
            await say(ws, "hello")
            await until_recovered(http, stack)
            before = await ask(ws, "before")
            assert before[-1]["type"] == "response.done", before[-1]

            # 1.5 s late: shedding lasts about 2.5 s after, time for the three refusals.
            await stall(stack, 1.5)
            await until_overloaded(http, stack)
            refused = await ask(ws, "during")
            # No response is created: the refusal costs the gateway nothing more.
            assert [e["type"] for e in refused] == ["error"]
            error = refused[0]["error"]
            assert error["code"] == "server_busy"
            assert error["event_id"] == "during"
            assert "overloaded" in error["message"]

            # A new connection and an HTTP request are refused too, with 503.
            with pytest.raises(websockets.InvalidStatus) as denied:
                await websockets.connect(
                    f"{stack.websocket_url}?model=gpt-realtime", additional_headers=headers
                )
            assert denied.value.response.status_code == 503
            async with http.post(
                f"{stack.gateway_url}/v1/chat/completions",
                headers=headers,
                json={"model": "gpt-realtime", "messages": [{"role": "user", "content": "hi"}]},
            ) as answer:
                assert answer.status == 503
                body = await answer.json()
            assert body["error"]["code"] == "server_busy"

            # Once the loop keeps time again, the same connection is served.
            await until_recovered(http, stack)
            assert (await ask(ws, "after"))[-1]["type"] == "response.done"

        async with http.get(f"{stack.gateway_url}/metrics") as answer:
            metrics = await answer.text()
    refusals = [
        line
        for line in metrics.splitlines()
        if line.startswith("switchboard_gateway_rejections_total{") and 'code="server_busy"' in line
    ]
    assert sum(float(line.split()[-1]) for line in refusals) >= 3


async def test_a_running_response_is_not_cut_by_the_shedding(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.dev_key}"}
    async with (
        aiohttp.ClientSession() as http,
        websockets.connect(
            f"{stack.websocket_url}?model=gpt-realtime", additional_headers=headers
        ) as ws,
    ):
        await events_until(ws, "session.created")
        await say(ws, "hello")
        await until_recovered(http, stack)
        await ws.send(orjson.dumps({"type": "response.create"}).decode())
        await events_until(ws, "response.output_text.delta")
        await stall(stack, 0.8)
        rest = await events_until(ws, "response.done", "error")
    assert rest[-1]["type"] == "response.done"
    assert rest[-1]["response"]["status"] == "completed"
