"""Voice sessions at the broker: RealtimeService over real gRPC to the simulator's
Realtime WebSocket, with the development tenant's `gpt-realtime-voice` model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest

from switchboard.broker.realtime_session import rewrite_session
from switchboard.v1 import common_pb2, realtime_pb2, realtime_pb2_grpc
from tests.broker.harness import (
    DEV_TENANT,
    DEV_UPSTREAM_KEY,
    collect,
    dev_env,
    generate_request,
    serving_channel,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

R = realtime_pb2
VOICE = "gpt-realtime-voice"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=10, token_delay_ms=1, api_key=DEV_UPSTREAM_KEY)
    async with run_simulator(config) as running:
        yield running


class Session:
    """One RealtimeService.Session call: requests from a queue, responses read one by one."""

    def __init__(self, stub: Any) -> None:
        self.requests: asyncio.Queue[R.RealtimeRequest | None] = asyncio.Queue()
        self.call = stub.Session(self._requests())

    async def _requests(self) -> AsyncIterator[R.RealtimeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def open(self, model: str = VOICE, session: dict[str, Any] | None = None) -> None:
        body = orjson.dumps(session).decode() if session else ""
        opening = R.RealtimeOpen(
            tenant_id=DEV_TENANT, session_id="sess_v1", model=model, session_json=body
        )
        self.requests.put_nowait(R.RealtimeRequest(open=opening))

    def send(self, *events: dict[str, Any]) -> None:
        batch = R.RealtimeEvents(events=[orjson.dumps(event) for event in events])
        self.requests.put_nowait(R.RealtimeRequest(events=batch))

    async def next(self) -> R.RealtimeResponse:
        response = await asyncio.wait_for(self.call.read(), 10)
        assert response is not None
        return response

    async def events_until(self, kind: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != kind:
            response = await self.next()
            assert response.WhichOneof("kind") == "events", response
            seen += [orjson.loads(event) for event in response.events.events]
        return seen


@pytest.fixture
async def broker(sim: RunningSimulator) -> AsyncIterator[Any]:
    env = dev_env(sim.base_url, SWITCHBOARD_BROKER_REALTIME_URL=sim.base_url)
    async with serving_channel(env) as (served, channel):
        yield realtime_pb2_grpc.RealtimeServiceStub(channel), served


def user_text(text: str) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {"type": "message", "role": "user", "content": content}


async def test_a_session_opens_configured_and_relays_a_spoken_turn(
    broker: Any, sim: RunningSimulator
) -> None:
    stub, _ = broker
    session = Session(stub)
    session.open(session={"type": "realtime", "instructions": "Be brief."})
    opened = await session.next()
    assert opened.opened.upstream == "realtime"
    assert opened.opened.upstream_model == "gpt-realtime"
    created = (await session.events_until("session.created"))[0]
    # The client sees Switchboard's id and model name, and the session as configured.
    assert created["session"]["id"] == "sess_v1"
    assert created["session"]["model"] == VOICE
    assert created["session"]["instructions"] == "Be brief."
    session.send({"type": "conversation.item.create", "item": user_text("hi")})
    session.send({"type": "response.create"})
    events = await session.events_until("response.done")
    kinds = [event["type"] for event in events]
    assert "response.output_audio.delta" in kinds
    assert events[-1]["response"]["usage"]["output_token_details"]["audio_tokens"] > 0
    session.requests.put_nowait(None)
    assert await asyncio.wait_for(session.call.read(), 5) is grpc.aio.EOF
    record = (await _realtime_log(sim))[-1]
    assert record["model"] == "gpt-realtime"
    assert record["client_events"] == {
        "session.update": 1,
        "conversation.item.create": 1,
        "response.create": 1,
    }


async def _realtime_log(sim: RunningSimulator) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/_sim/realtime") as answer:
        sessions: list[dict[str, Any]] = (await answer.json())["sessions"]
        return sessions


async def test_ending_the_requests_closes_the_upstream_socket(
    broker: Any, sim: RunningSimulator
) -> None:
    stub, _ = broker
    session = Session(stub)
    session.open()
    await session.next()
    await session.events_until("session.created")
    session.requests.put_nowait(None)
    async with asyncio.timeout(5):
        while (await _realtime_log(sim))[-1]["ended_at"] is None:
            await asyncio.sleep(0.02)


async def test_a_refused_upstream_is_an_upstream_error_naming_no_url_or_key(
    broker: Any, sim: RunningSimulator
) -> None:
    stub, _ = broker
    await sim.configure({"status": 503})
    session = Session(stub)
    session.open()
    failure = (await session.next()).failure
    assert failure.code == common_pb2.ERROR_CODE_UPSTREAM_ERROR
    assert "503" in failure.message
    for secret in (sim.url, str(sim.url.rsplit(":", 1)[1]), DEV_UPSTREAM_KEY):
        assert secret not in failure.message


async def test_an_upstream_that_drops_the_socket_ends_the_session_with_stream_broken(
    broker: Any,
) -> None:
    stub, _ = broker
    session = Session(stub)
    session.open(session={"instructions": '[[sim {"disconnect_after": 1}]]'})
    await session.next()
    await session.events_until("session.created")
    session.send({"type": "conversation.item.create", "item": user_text("hi")})
    session.send({"type": "response.create"})
    while (response := await session.next()).WhichOneof("kind") == "events":
        pass
    assert response.failure.code == common_pb2.ERROR_CODE_UPSTREAM_STREAM_BROKEN


async def test_models_are_served_only_by_their_kind_of_upstream(broker: Any) -> None:
    stub, served = broker
    session = Session(stub)
    session.open(model="sim-small")
    failure = (await session.next()).failure
    assert failure.code == common_pb2.ERROR_CODE_UNSUPPORTED_FEATURE
    assert failure.param == "model"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(served.stub, generate_request(model=VOICE))
    assert "voice model" in str(refused.value)


def test_only_session_events_are_rewritten() -> None:
    audio = b'{"type":"response.output_audio.delta","delta":"session.created"}'
    assert rewrite_session(audio, "sess_1", "m") is audio
    event = b'{"type":"session.updated","session":{"id":"sess_up","model":"gpt-realtime"}}'
    rewritten = orjson.loads(rewrite_session(event, "sess_1", "voice"))
    assert rewritten["session"] == {"id": "sess_1", "model": "voice"}
