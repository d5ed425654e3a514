"""Connection lifetime limits: the idle timeout (4010) and a tenant's maximum session
length (4011) each end a connection with its own error and close code, and never
cut a running response; a client that stops answering the heartbeat ping is
dropped (1011) while clients that answer stay."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Iterator

import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tools.stack import Ports, Stack

STEADY_KEY, BRIEF_KEY = new_key(), new_key()
IDLE_S = 2.0

TENANTS = f"""
  steady:
    keys: ["{hash_key(STEADY_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
  brief:
    keys: ["{hash_key(BRIEF_KEY)}"]
    models: {{gpt-realtime: {{upstream: default}}}}
    limits: {{max_session_seconds: 3}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    path = tenants_file(tmp_path_factory.mktemp("tenants"), ports, TENANTS)
    stack = Stack(
        ports=ports,
        extra_env={
            "SWITCHBOARD_TENANTS_FILE": str(path),
            "SWITCHBOARD_GATEWAY_IDLE_TIMEOUT_S": str(IDLE_S),
            "SWITCHBOARD_GATEWAY_PING_INTERVAL_S": "0.5",
            "SWITCHBOARD_GATEWAY_PING_TIMEOUT_S": "0.5",
        },
    )
    with stack:
        yield stack


def open_client(stack: Stack, key: str) -> websockets.asyncio.client.connect:
    return websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {key}"},
    )


async def until_closed(client: RealtimeClient) -> tuple[list[str], int]:
    """The error codes received until the connection closed, and its close code."""
    codes = []
    while True:
        try:
            event = await client.recv(timeout_s=15)
        except websockets.ConnectionClosed as closed:
            return codes, closed.rcvd.code if closed.rcvd is not None else 1006
        if event["type"] == "error":
            codes.append(event["error"]["code"])


async def test_an_idle_connection_is_closed_with_4010(stack: Stack) -> None:
    opened = time.monotonic()
    async with open_client(stack, STEADY_KEY) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        codes, close_code = await until_closed(client)
        assert time.monotonic() - opened >= IDLE_S
    assert codes == ["idle_timeout"]
    assert close_code == 4010


async def test_a_running_response_is_never_cut_by_the_idle_timeout(stack: Stack) -> None:
    async with open_client(stack, STEADY_KEY) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        # About 3 s of streaming, longer than the idle timeout.
        await client.say('slow [[sim {"tokens": 100, "token_delay_ms": 30}]]')
        events = await client.respond()
        assert events[-1]["response"]["status"] == "completed"
        assert len(reply_text(events).split()) == 100
        codes, close_code = await until_closed(client)
    assert (codes, close_code) == (["idle_timeout"], 4010)


async def test_the_tenants_session_length_closes_with_4011(stack: Stack) -> None:
    async with open_client(stack, BRIEF_KEY) as connection:
        client = RealtimeClient(connection)
        await client.recv()

        async def keep_busy() -> None:  # never idle
            while True:
                await client.send({"type": "conversation.item.retrieve", "item_id": "none"})
                await asyncio.sleep(0.5)

        busy = asyncio.create_task(keep_busy())
        try:
            codes, close_code = await until_closed(client)
        finally:
            busy.cancel()
    assert codes[-1] == "session_expired"
    assert set(codes[:-1]) <= {"item_not_found"}
    assert close_code == 4011


async def test_a_client_that_does_not_answer_pings_is_dropped(stack: Stack) -> None:
    """A raw socket that upgrades and then never reads (so never answers a ping)."""
    sock = socket.create_connection(("127.0.0.1", stack.ports.gateway))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{stack.ports.gateway}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {STEADY_KEY}\r\n\r\n"
        ).encode()
    )
    await asyncio.sleep(2.5)  # interval + timeout, well past
    # What the gateway sent meanwhile: the 101, session.created, pings, then the
    # close frame 1011 "keepalive ping timeout", and the end of the stream.
    sock.settimeout(5)
    received = b""
    while chunk := await asyncio.to_thread(sock.recv, 65536):
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 101")
    assert b"keepalive ping timeout" in received
    close = received[received.rindex(b"\x88") :]  # the close frame: opcode 8, FIN
    assert int.from_bytes(close[2:4], "big") == 1011


async def test_a_client_that_answers_pings_stays(stack: Stack) -> None:
    async with open_client(stack, STEADY_KEY) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await asyncio.sleep(1.5)  # three heartbeats, answered by the client library
        await client.say("still here")
        assert (await client.respond())[-1]["response"]["status"] == "completed"
