"""A multi-turn conversation through all four services with the official openai SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from tools.stack import Stack


def sdk_client(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=stack.dev_key,
        base_url=f"{stack.gateway_url}/v1",
        websocket_base_url=f"ws://127.0.0.1:{stack.ports.gateway}/v1",
    )


async def collect(connection: Any) -> list[Any]:
    events = []
    async for event in connection:
        events.append(event)
        if event.type == "response.done":
            return events
    raise AssertionError("connection closed before response.done")


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def test_three_turns_each_sees_the_earlier_ones(stack: Stack) -> None:
    client = sdk_client(stack)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(
            session={"type": "realtime", "instructions": "You are a test double."}
        )
        updated = await connection.recv()
        assert updated.type == "session.updated"
        assert updated.session.instructions == "You are a test double."

        replies = []
        for text in ("alpha", "bravo", 'charlie [[sim {"echo_context": true}]]'):
            await connection.conversation.item.create(item=user_message(text))
            await connection.response.create()
            events = await collect(connection)
            done = events[-1]
            assert done.response.status == "completed"
            usage = done.response.usage
            assert usage.input_tokens > 0 and usage.output_tokens > 0
            assert usage.total_tokens == usage.input_tokens + usage.output_tokens
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            text_done = next(e for e in events if e.type == "response.output_text.done")
            assert text_done.text == deltas
            replies.append(deltas)

        assert replies[0].startswith('turn 1: you said "alpha".')
        assert replies[1].startswith('turn 2: you said "bravo"; earlier: "alpha".')
        # The third turn saw both earlier questions and both earlier answers: the
        # model got instructions + 3 user + 2 assistant messages.
        assert replies[2].startswith('turn 3: you said "charlie"; earlier: "alpha" | "bravo"')
        assert "context=6" in replies[2]
    await client.close()


async def test_cancel_mid_stream_closes_the_upstream(stack: Stack) -> None:
    async with aiohttp.ClientSession(base_url=stack.simulator_url) as sim:
        client = sdk_client(stack)
        async with client.realtime.connect(model="gpt-realtime") as connection:
            await connection.recv()
            slow = 'tell me a long story [[sim {"tokens": 400, "token_delay_ms": 50}]]'
            await connection.conversation.item.create(item=user_message(slow))
            await connection.response.create()
            async for event in connection:
                if event.type == "response.output_text.delta":
                    break
            cancelled_at = time.time()
            await connection.response.cancel()
            events = await collect(connection)
            done = events[-1]
            assert done.response.status == "cancelled"
            assert done.response.status_details.reason == "client_cancelled"
            assert done.response.usage.output_tokens > 0
            assert done.response.usage.input_tokens > 0

            # The simulator saw its stream closed by the client, long before the
            # 20 s the full reply would take.
            record = None
            for _ in range(50):
                async with sim.get("/_sim/streams") as reply:
                    streams = (await reply.json())["streams"]
                record = next(s for s in reversed(streams) if "long story" in s["last_user"])
                if record["outcome"] != "in_progress":
                    break
                await asyncio.sleep(0.1)
            assert record is not None
            assert record["outcome"] == "client_closed"
            assert record["tokens_sent"] < 400
            assert record["ended_at"] - cancelled_at < 2.0

            # The conversation goes on after the cancel.
            await connection.conversation.item.create(item=user_message("still there?"))
            await connection.response.create()
            events = await collect(connection)
            assert events[-1].response.status == "completed"
        await client.close()
