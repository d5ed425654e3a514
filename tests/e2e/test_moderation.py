"""Moderation end to end: a tenant's policy, checks at the simulator's `/v1/moderations`
through the broker, a flagged message refused, a flagged response stopped mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from switchboard.tenancy import hash_key
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tools.stack import Ports, Stack

STRICT_KEY = "sk-sb-strict-moderation-key-01"
LENIENT_KEY = "sk-sb-lenient-moderation-key-1"
MARKER = "sbflag-violence"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = f"""  strict:
    keys: ["{hash_key(STRICT_KEY)}"]
    models:
      gpt-realtime: {{}}
    moderation:
      mode: input_output
      window_chars: 40
      overlap_chars: 30
      hold_back_chars: 0
  lenient:
    keys: ["{hash_key(LENIENT_KEY)}"]
    models:
      gpt-realtime: {{}}
    moderation:
      mode: input
      categories: [hate]
"""
    path = tenants_file(Path(tmp_path_factory.mktemp("moderation")), ports, tenants)
    stack = Stack(
        ports=ports,
        simulator_args=["--ttft-ms", "10", "--token-delay-ms", "5", "--reply-tokens", "40"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    )
    with stack:
        yield stack


async def open_client(stack: Stack, key: str) -> RealtimeClient:
    connection = await websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {key}"},
    )
    client = RealtimeClient(connection)
    assert (await client.recv())["type"] == "session.created"
    return client


@pytest.fixture
async def strict(stack: Stack) -> AsyncIterator[RealtimeClient]:
    client = await open_client(stack, STRICT_KEY)
    yield client
    await client.connection.close()


def directive(**options: Any) -> str:
    return f"[[sim {orjson.dumps(options).decode()}]]"


async def say(client: RealtimeClient, text: str) -> dict[str, Any]:
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            },
        }
    )
    event = await client.recv()
    while event["type"] not in ("conversation.item.done", "error"):
        event = await client.recv()
    return event


async def test_a_flagged_message_is_refused_and_never_reaches_the_model(
    strict: RealtimeClient,
) -> None:
    event = await say(strict, f"hello {MARKER} there")
    assert event["type"] == "error"
    error = event["error"]
    assert (error["code"], error["param"]) == ("input_flagged", "item.content")
    assert "violence" in error["message"] and MARKER not in error["message"]
    assert (await say(strict, "a clean question"))["type"] == "conversation.item.done"
    events = await strict.respond()
    # The model saw one user message: the refused one was never stored.
    assert reply_text(events).startswith('turn 1: you said "a clean question".')


async def test_a_category_the_policy_does_not_block_passes(stack: Stack) -> None:
    client = await open_client(stack, LENIENT_KEY)
    try:
        assert (await say(client, f"hello {MARKER}"))["type"] == "conversation.item.done"
        assert (await say(client, "hello sbflag-hate"))["type"] == "error"
    finally:
        await client.connection.close()


async def stream_of(stack: Stack, marker: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.simulator_url}/_sim/streams") as reply,
    ):
        streams = (await reply.json())["streams"]
    found: dict[str, Any] = next(s for s in reversed(streams) if marker in s["last_user"])
    return found


async def test_flagged_output_stops_the_response_before_the_client_sees_it(
    stack: Stack, strict: RealtimeClient
) -> None:
    # The simulator puts the marker in its reply after 12 words, out of 200.
    request = "tell me a story story-7 " + directive(flag="violence", flag_at=12, tokens=200)
    assert (await say(strict, request))["type"] == "conversation.item.done"
    events = await strict.respond()
    done = events[-1]["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"]["reason"] == "content_filter"
    sent = reply_text(events)
    # hold_back_chars 0: only checked text was sent, and the marker never was.
    assert sent and MARKER not in sent and "sbflag" not in sent
    assert done["output"][0]["status"] == "incomplete"
    assert done["output"][0]["content"][0]["text"] == sent
    # The upstream stream was closed long before its 200 words.
    deadline = time.monotonic() + 10
    while (stream := await stream_of(stack, "story-7"))["outcome"] == "in_progress":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert stream["outcome"] == "client_closed"
    assert stream["tokens_sent"] < 200


async def test_clean_output_is_all_sent(strict: RealtimeClient) -> None:
    assert (await say(strict, "a clean story " + directive(tokens=60)))[
        "type"
    ] == "conversation.item.done"
    events = await strict.respond()
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert len(reply_text(events).split()) == 60
