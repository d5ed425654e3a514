"""Bad frames get specific errors; the connection and other sessions carry on."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets
from websockets.protocol import State

from tests.e2e.conftest import RealtimeClient, connect, reply_text
from tools.stack import Stack


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{this is not json", "invalid_json"),
        (b"\x00\x01binary", "binary_frame_unsupported"),
        ('{"type": "conversation.explode"}', "unknown_event_type"),
        ('{"type": "conversation.item.create"}', "missing_required_parameter"),
        ('{"type": "session.update", "session": {}}', "missing_required_parameter"),
        ('{"type": "response.cancel"}', "response_cancel_not_active"),
        ('{"type": "conversation.item.retrieve", "item_id": "item_nope"}', "item_not_found"),
        ('{"type": "conversation.item.create", "pad": "' + "x" * 300_000 + '"}', "frame_too_large"),
    ],
)
async def test_bad_frame_gets_error_and_connection_stays_usable(
    client: RealtimeClient, frame: str | bytes, code: str
) -> None:
    await client.connection.send(frame)
    error = await client.recv()
    assert error["type"] == "error"
    assert error["error"]["code"] == code
    assert error["event_id"]
    done = await client.say("after the error")
    assert done["item"]["content"][0]["text"] == "after the error"


async def test_frame_over_the_transport_cap_closes_1009(stack: Stack) -> None:
    connection = await connect(stack, max_size=None)
    try:
        await connection.recv()

        async def send_and_read() -> None:
            await connection.send("x" * (5 * 1024 * 1024))
            await asyncio.wait_for(connection.recv(), 10)

        with pytest.raises(websockets.ConnectionClosed) as closed:
            await send_and_read()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    finally:
        # Not `async with`: closing again a connection the server dropped in the middle of
        # our 5 MiB write can trip over asyncio's already-closed transport (CPython 3.11,
        # AttributeError in _force_close); by then there is nothing left to close.
        if connection.state is not State.CLOSED:
            await connection.close()


async def test_bad_input_does_not_touch_another_session(stack: Stack) -> None:
    async with connect(stack) as good_conn, connect(stack) as bad_conn:
        good, bad = RealtimeClient(good_conn), RealtimeClient(bad_conn)
        await good.recv()
        await bad.recv()
        await good.say("first words")
        for frame in ("{", b"\xff", '{"type": 3}', '{"type": "response.create", "response": 5}'):
            await bad.connection.send(frame)
            assert (await bad.recv())["type"] == "error"
        events = await good.respond()
        assert events[-1]["response"]["status"] == "completed"
        assert reply_text(events).startswith('turn 1: you said "first words"')


async def test_missing_or_wrong_key_is_refused_with_401(stack: Stack) -> None:
    for key in ("", "sk-sb-wrong"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(stack, key=key):
                pass
        assert refused.value.response.status_code == 401
        assert b"invalid_api_key" in refused.value.response.body


async def test_health_endpoints(stack: Stack) -> None:
    async with aiohttp.ClientSession(base_url=stack.gateway_url) as http:
        async with http.get("/healthz") as health:
            assert await health.text() == "ok"
        async with http.get("/readyz") as ready:
            assert ready.status == 200
            body = await ready.json()
        assert body == {
            "ready": True,
            "checks": {"session": True, "broker": True, "toolexec": True, "redis": True},
        }
