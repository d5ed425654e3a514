"""The broker's Realtime upstream client (aiohttp's WebSocket) against the
simulator and plain sockets: events as bytes both ways, its end, its refusals."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import orjson
import pytest

from switchboard.broker.realtime_upstream import UpstreamClosed, connect
from switchboard.config import Secret
from switchboard.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout
from switchboard.tenancy import Upstream
from tests.broker.harness import DEV_UPSTREAM_KEY
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=10, token_delay_ms=1, api_key=DEV_UPSTREAM_KEY)
    async with run_simulator(config) as running:
        yield running


def upstream(base_url: str, key: str = DEV_UPSTREAM_KEY) -> Upstream:
    return Upstream("realtime", base_url, api_key=Secret(key), kind="realtime")


async def test_events_go_both_ways_as_bytes_and_a_close_ends_both_directions(
    sim: RunningSimulator,
) -> None:
    socket_ = await connect(upstream(sim.base_url), "gpt-realtime", timeout_s=5, headers={})
    created = await socket_.recv()
    assert isinstance(created, bytes)
    assert orjson.loads(created)["type"] == "session.created"
    await socket_.send(b'{"type":"session.update","session":{"instructions":"hi"}}')
    await socket_.send('{"type":"input_audio_buffer.clear"}')  # text is sent as text too
    kinds = [orjson.loads(await socket_.recv())["type"] for _ in range(2)]
    assert kinds == ["session.updated", "input_audio_buffer.cleared"]
    reading = asyncio.create_task(socket_.recv())
    await asyncio.sleep(0.05)
    await socket_.close()
    with pytest.raises(UpstreamClosed):
        await asyncio.wait_for(reading, 5)  # a reader waiting when the socket closes
    with pytest.raises(UpstreamClosed):
        await socket_.recv()
    with pytest.raises(UpstreamClosed):
        await socket_.send(b'{"type":"input_audio_buffer.clear"}')
    await socket_.close()  # idempotent


async def test_refusals_are_specific_errors_that_name_no_url_or_key(
    sim: RunningSimulator,
) -> None:
    await sim.configure({"status": 429})
    with pytest.raises(UpstreamRateLimited):
        await connect(upstream(sim.base_url), "gpt-realtime", timeout_s=5, headers={})
    await sim.configure({})
    with pytest.raises(UpstreamError) as refused:
        await connect(upstream(sim.base_url, "sk-wrong"), "gpt-realtime", timeout_s=5, headers={})
    assert "credentials" in refused.value.message
    assert "sk-wrong" not in refused.value.message and sim.url not in refused.value.message


async def test_an_unreachable_or_silent_upstream_fails_in_time() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(UpstreamError) as unreachable:
        await connect(upstream(f"http://127.0.0.1:{port}/v1"), "m", timeout_s=5, headers={})
    assert "could not be reached" in unreachable.value.message
    assert str(port) not in unreachable.value.message

    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # takes the handshake, never answers it

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(UpstreamTimeout):
            await connect(upstream(f"http://127.0.0.1:{port}/v1"), "m", timeout_s=0.3, headers={})
        assert accepted
        for writer in accepted:
            writer.close()
            await writer.wait_closed()
