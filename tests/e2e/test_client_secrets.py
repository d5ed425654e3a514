"""Ephemeral client secrets: minted with the official SDK, used by browsers and servers."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import redis.asyncio
import websockets
from openai import AsyncOpenAI, AuthenticationError

from tests.e2e.conftest import RealtimeClient, connect, reply_text
from tools.stack import Stack


def sdk(stack: Stack, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=key,
        base_url=f"{stack.gateway_url}/v1",
        websocket_base_url=f"ws://127.0.0.1:{stack.ports.gateway}/v1",
    )


async def mint(stack: Stack, seconds: int = 120, **session: object) -> str:
    client = sdk(stack, stack.dev_key)
    secret = await client.realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime", **session},  # type: ignore[typeddict-item]
        expires_after={"anchor": "created_at", "seconds": seconds},
    )
    await client.close()
    assert secret.value.startswith("ek_")
    assert abs(secret.expires_at - (time.time() + seconds)) < 5
    return secret.value


def browser(stack: Stack, credential: str) -> websockets.asyncio.client.connect:
    return websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        subprotocols=["realtime", f"openai-insecure-api-key.{credential}"],  # type: ignore[list-item]
    )


async def test_sdk_mints_and_a_second_sdk_client_connects_with_it(stack: Stack) -> None:
    secret = await mint(stack, instructions="Only talk about weather.")
    client = sdk(stack, secret)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        assert created.session.instructions == "Only talk about weather."
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            }
        )
        await connection.response.create()
        async for event in connection:
            if event.type == "response.done":
                assert event.response.status == "completed"
                break
    await client.close()


async def test_browser_subprotocols_and_locked_fields(stack: Stack) -> None:
    secret = await mint(stack, instructions="Locked in.")
    async with browser(stack, secret) as connection:
        assert connection.subprotocol == "realtime"
        client = RealtimeClient(connection)
        assert (await client.recv())["session"]["instructions"] == "Locked in."
        await client.send(
            {"type": "session.update", "session": {"type": "realtime", "instructions": "Obey me."}}
        )
        error = await client.recv()
        assert error["error"]["code"] == "field_locked"
        assert error["error"]["param"] == "session.instructions"
        # Fields that are not locked can change; the same locked value is fine.
        await client.send(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "instructions": "Locked in.",
                    "max_output_tokens": 50,
                },
            }
        )
        updated = await client.recv()
        assert updated["type"] == "session.updated"
        assert updated["session"]["max_output_tokens"] == 50
        await client.say("hello from a browser")
        assert reply_text(await client.respond()).startswith('turn 1: you said "hello')


async def test_refused_credentials(stack: Stack) -> None:
    secret = await mint(stack)
    refused = [
        browser(stack, stack.dev_key),  # a tenant key must never sit in a browser
        browser(stack, "ek_forged" + secret[9:]),
        connect(stack, key="ek_" + "x" * 43),
    ]
    for attempt in refused:
        with pytest.raises(websockets.InvalidStatus) as denied:
            async with attempt:
                pass
        assert denied.value.response.status_code == 401
    # The secret is for gpt-realtime: asking for another model is refused.
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(
            f"{stack.websocket_url}?model=other-model",
            additional_headers={"Authorization": f"Bearer {secret}"},
        ):
            pass
    assert denied.value.response.status_code == 403
    assert b"field_locked" in denied.value.response.body


async def test_an_expired_secret_is_refused(stack: Stack) -> None:
    secret = await mint(stack, seconds=60)
    async with browser(stack, secret):
        pass
    # Expire it now, as Redis would after its TTL.
    digest = hashlib.sha256(secret.encode()).hexdigest()
    store = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{stack.ports.redis}/0")
    assert await store.pexpire("sb:ek:{" + digest + "}", 1)
    await store.aclose()
    await asyncio.sleep(0.05)
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with browser(stack, secret):
            pass
    assert denied.value.response.status_code == 401


async def test_minting_needs_a_tenant_key_and_a_valid_ttl(stack: Stack) -> None:
    secret = await mint(stack)
    for key in ("sk-sb-wrong", secret):
        client = sdk(stack, key)
        with pytest.raises(AuthenticationError):
            await client.realtime.client_secrets.create(session={"type": "realtime"})
        await client.close()
    client = sdk(stack, stack.dev_key)
    with pytest.raises(Exception, match=r"expires_after\.seconds"):
        await client.realtime.client_secrets.create(
            session={"type": "realtime"}, expires_after={"anchor": "created_at", "seconds": 5}
        )
    await client.close()
