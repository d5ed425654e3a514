"""Graceful drain: a rolling restart of two gateway processes under steady load
loses no response; a broker on SIGTERM finishes the stream it is serving.

Clients talk to either gateway. On SIGTERM a gateway stops taking connections,
lets running responses finish, and closes each connection with 1012 once it is
idle; its clients resume their session on the other gateway and go on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import websockets

from tools.stack import Ports, Stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(
        ports=Ports.free(),
        replicas=2,
        simulator_args=["--ttft-ms", "30", "--token-delay-ms", "20", "--reply-tokens", "20"],
        extra_env={"SWITCHBOARD_GATEWAY_DRAIN_TIMEOUT_S": "10"},
    )
    with stack:
        yield stack


class Client:
    """A client that keeps asking, and on 1012 (or a refused or failed connection)
    resumes its session on the other gateway, re-asking only what never started."""

    def __init__(self, stack: Stack, number: int) -> None:
        self.stack = stack
        self.gateway = number % 2
        self.session_id = ""
        self.last_event_id = ""
        self.statuses: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()
        self.connection: Any = None

    async def _connect(self) -> None:
        for _ in range(200):
            port = self.stack.gateway_ports[self.gateway]
            query = "model=gpt-realtime"
            if self.session_id:
                query += f"&session_id={self.session_id}&last_event_id={self.last_event_id}"
            try:
                self.connection = await websockets.connect(
                    f"ws://127.0.0.1:{port}/v1/realtime?{query}",
                    additional_headers={"Authorization": f"Bearer {self.stack.dev_key}"},
                    open_timeout=5,
                )
                return
            except (OSError, websockets.InvalidStatus, TimeoutError):
                self.gateway = 1 - self.gateway  # down or draining: the other one
                await asyncio.sleep(0.05)
        raise AssertionError("no gateway took the connection")

    async def _next(self) -> dict[str, Any] | None:
        """The next event, or None when the connection closed."""
        try:
            event: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.connection.recv(), 30))
        except websockets.ConnectionClosed as closed:
            self.closes[closed.rcvd.code if closed.rcvd else 1006] += 1
            self.gateway = 1 - self.gateway
            return None
        self.last_event_id = event["event_id"]
        if event["type"] == "session.created":
            self.session_id = event["session"]["id"]
        return event

    async def turn(self, number: int) -> None:
        """Ask once and follow the response to its end, across reconnections."""
        asked = started = False
        while True:
            if self.connection is None:
                await self._connect()
            if not asked:
                item = {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": f"turn {number}"}],
                }
                try:
                    await self.connection.send(
                        orjson.dumps({"type": "conversation.item.create", "item": item}).decode()
                    )
                    await self.connection.send('{"type":"response.create"}')
                    asked = True
                except websockets.ConnectionClosed as closed:
                    self.closes[closed.rcvd.code if closed.rcvd else 1006] += 1
                    self.gateway = 1 - self.gateway
                    self.connection = None
                    continue
            event = await self._next()
            if event is None:
                self.connection = None
                # Asked but never started (the gateway closed first): ask again.
                asked = started
                continue
            if event["type"] == "response.created":
                started = True
            elif event["type"] == "response.done" and started:
                self.statuses[event["response"]["status"]] += 1
                return

    async def run(self, stop: asyncio.Event) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            await self.turn(number)
        await self.connection.close()


async def test_a_rolling_restart_under_load_loses_no_response(stack: Stack) -> None:
    stop = asyncio.Event()
    clients = [Client(stack, n) for n in range(6)]
    load = [asyncio.create_task(client.run(stop)) for client in clients]
    await asyncio.sleep(2)
    for name in ("gateway", "gateway-2"):
        # SIGTERM, wait for the drain and the exit, start it again, wait until ready.
        await asyncio.to_thread(stack.restart, name)
        await asyncio.sleep(2)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*load), 60)

    statuses = sum((c.statuses for c in clients), Counter())
    closes = sum((c.closes for c in clients), Counter())
    print(f"responses by status: {dict(statuses)}; closes by code: {dict(closes)}")
    assert statuses["completed"] >= 6 * 5, statuses
    assert set(statuses) == {"completed"}, statuses
    # Clients were moved by drains (1012), not cut.
    assert closes[1012] >= 1, closes
    assert set(closes) <= {1012}, closes


async def test_a_broker_drains_its_running_streams_on_sigterm(stack: Stack) -> None:
    """SIGTERM on the broker: it stops taking calls (health NOT_SERVING) but the
    response it is streaming completes; then it exits."""
    broker = stack.services["broker"]
    port = stack.gateway_ports[0]  # the first gateway talks to the first broker
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
        ) as connection:
            item = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": 'long [[sim {"tokens": 150}]]'}],
            }
            await connection.send(
                orjson.dumps({"type": "conversation.item.create", "item": item}).decode()
            )
            await connection.send('{"type":"response.create"}')
            while orjson.loads(await connection.recv())["type"] != "response.output_text.delta":
                pass
            assert broker.process is not None
            broker.process.terminate()
            words = 1
            while True:
                event = orjson.loads(await asyncio.wait_for(connection.recv(), 30))
                if event["type"] == "response.output_text.delta":
                    words += len(event["delta"].split())
                elif event["type"] == "response.done":
                    break
            assert event["response"]["status"] == "completed"
            assert words >= 100  # ~3 s of streaming after the SIGTERM, then the end
            assert await asyncio.to_thread(broker.process.wait, 15) == 0
    finally:
        await asyncio.to_thread(stack.restart, "broker")
