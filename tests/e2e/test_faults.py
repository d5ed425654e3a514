"""Killing Redis or a backend mid-conversation: a clear error, /readyz says so, recovery."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.e2e.conftest import RealtimeClient, connect, reply_text
from tools.stack import Stack


async def wait_ready(
    stack: Stack, expected: bool, timeout_s: float = 15.0, *, failing: str | None = None
) -> dict[str, bool]:
    """Poll /readyz until it is (not) ready, and, if named, that check has failed."""
    async with aiohttp.ClientSession(base_url=stack.gateway_url) as http:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            async with http.get("/readyz") as reply:
                body = await reply.json()
                checks: dict[str, bool] = body["checks"]
                if (reply.status == 200) == expected and (failing is None or not checks[failing]):
                    return checks
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.2)


async def test_redis_killed_and_back(stack: Stack) -> None:
    assert stack.redis is not None
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say("before the outage")
        stack.redis.stop(kill=True)
        try:
            await client.send(
                {
                    "type": "conversation.item.create",
                    "event_id": "during",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "during"}],
                    },
                }
            )
            error = await client.recv(timeout_s=10)
            assert error["type"] == "error"
            assert error["error"]["code"] == "session_store_unavailable"
            assert error["error"]["event_id"] == "during"
            checks = await wait_ready(stack, expected=False, failing="session")
            assert checks["redis"] is False
            assert checks["broker"] is True
        finally:
            stack.redis.start()
        await wait_ready(stack, expected=True)
        await client.say("after the outage")
        events = await client.respond()
        assert events[-1]["response"]["status"] == "completed"
        assert 'you said "after the outage"' in reply_text(events)
        assert '"before the outage"' in reply_text(events)


async def test_broker_killed_and_back(stack: Stack) -> None:
    broker = stack.services["broker"]
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say("hello")
        assert broker.process is not None
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait()
        try:
            events = await client.respond()
            errors = [e for e in events if e["type"] == "error"]
            assert [e["error"]["code"] for e in errors] == ["service_unavailable"]
            done = events[-1]["response"]
            assert done["status"] == "failed"
            assert done["status_details"]["error"]["code"] == "service_unavailable"
            assert done["usage"]["total_tokens"] >= 0
            checks = await wait_ready(stack, expected=False)
            assert checks["broker"] is False
        finally:
            stack.restart("broker")
        await wait_ready(stack, expected=True)
        events = await client.respond()
        assert events[-1]["response"]["status"] == "completed"


async def test_session_service_killed_and_back(stack: Stack) -> None:
    session = stack.services["session"]
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await client.say("one")
        assert session.process is not None
        session.process.send_signal(signal.SIGKILL)
        session.process.wait()
        try:
            await client.send({"type": "conversation.item.retrieve", "item_id": "item_x"})
            error = await client.recv()
            assert error["error"]["code"] == "service_unavailable"
            assert "session" in error["error"]["message"]
        finally:
            stack.restart("session")
        await wait_ready(stack, expected=True)
        await client.say("two")
        events = await client.respond()
        assert reply_text(events).startswith('turn 2: you said "two"; earlier: "one"')
