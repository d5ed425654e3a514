"""Voice sessions over one call: the gateway's `VoiceMux` against the broker's
`RealtimeService.Sessions`, over real gRPC, to the simulator's Realtime WebSocket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from switchboard.gateway.voice_mux import MuxBroken, MuxedSession, VoiceMux
from switchboard.v1 import realtime_pb2, realtime_pb2_grpc
from tests.broker.harness import DEV_TENANT, DEV_UPSTREAM_KEY, Served, dev_env, serving_channel
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

R = realtime_pb2
VOICE = "gpt-realtime-voice"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=10, token_delay_ms=1, api_key=DEV_UPSTREAM_KEY)
    async with run_simulator(config) as running:
        yield running


@pytest.fixture
async def served(sim: RunningSimulator) -> AsyncIterator[tuple[Served, VoiceMux]]:
    # A session its gateway left is held for a resume (test_realtime.py); here
    # not at all, so that leaving a session ends its upstream at once.
    env = dev_env(
        sim.base_url,
        SWITCHBOARD_BROKER_REALTIME_URL=sim.base_url,
        SWITCHBOARD_BROKER_VOICE_HOLD_S="0",
    )
    async with serving_channel(env) as (served, channel):
        mux = VoiceMux(realtime_pb2_grpc.RealtimeServiceStub(channel), "127.0.0.1:0")
        try:
            yield served, mux
        finally:
            await mux.close()


class Voice:
    """One session on the mux, driven as voice_connection.py drives it."""

    def __init__(self, mux: VoiceMux, session_id: str) -> None:
        self.requests: asyncio.Queue[R.RealtimeRequest | None] = asyncio.Queue()
        opening = R.RealtimeOpen(tenant_id=DEV_TENANT, session_id=session_id, model=VOICE)
        self.requests.put_nowait(R.RealtimeRequest(open=opening))
        self.call: MuxedSession = mux.Session(self._requests())
        self.responses = aiter(self.call)

    async def _requests(self) -> AsyncIterator[R.RealtimeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def send(self, *events: dict[str, Any]) -> None:
        batch = R.RealtimeEvents(events=[orjson.dumps(event) for event in events])
        self.requests.put_nowait(R.RealtimeRequest(events=batch))

    async def events_until(self, kind: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != kind:
            response = await asyncio.wait_for(anext(self.responses), 15)
            if response.WhichOneof("kind") == "opened":
                continue
            assert response.WhichOneof("kind") == "events", response
            seen += [orjson.loads(event) for event in response.events.events]
        return seen

    async def turn(self, text: str) -> str:
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        self.send({"type": "conversation.item.create", "item": item}, {"type": "response.create"})
        events = await self.events_until("response.done")
        return str(events[-1]["response"]["status"])


async def _realtime_log(sim: RunningSimulator) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/_sim/realtime") as answer:
        sessions: list[dict[str, Any]] = (await answer.json())["sessions"]
        return sessions


async def _upstream_ended(sim: RunningSimulator, count: int) -> None:
    async with asyncio.timeout(15):
        while sum(s["ended_at"] is not None for s in await _realtime_log(sim)) < count:
            await asyncio.sleep(0.02)


async def test_sessions_share_one_call_and_each_gets_its_own_events(
    served: tuple[Served, VoiceMux], sim: RunningSimulator
) -> None:
    _, mux = served
    first, second = Voice(mux, "sess_a"), Voice(mux, "sess_b")
    created = await asyncio.gather(
        first.events_until("session.created"), second.events_until("session.created")
    )
    assert [events[-1]["session"]["id"] for events in created] == ["sess_a", "sess_b"]
    assert len(mux._readers) == 1  # one Sessions call carries both
    assert await asyncio.gather(first.turn("hi"), second.turn("hello")) == [
        "completed",
        "completed",
    ]
    assert len(await _realtime_log(sim)) == 2


async def test_a_cancelled_session_closes_its_upstream_and_the_other_goes_on(
    served: tuple[Served, VoiceMux], sim: RunningSimulator
) -> None:
    _, mux = served
    first, second = Voice(mux, "sess_a"), Voice(mux, "sess_b")
    await first.events_until("session.created")
    await second.events_until("session.created")
    first.call.cancel()
    await _upstream_ended(sim, 1)
    assert await second.turn("still there?") == "completed"
    # Ending the requests ends the session too, as a Session call's would.
    second.requests.put_nowait(None)
    await _upstream_ended(sim, 2)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(second.responses), 15)


async def test_a_draining_broker_sends_new_sessions_to_a_new_call(
    served: tuple[Served, VoiceMux], sim: RunningSimulator
) -> None:
    broker, mux = served
    old = Voice(mux, "sess_old")
    await old.events_until("session.created")
    broker.servicer.drain()
    assert await old.turn("one more") == "completed"  # running sessions go on
    # A new session goes on a new call, which a draining broker refuses: with a
    # failure if its first frame came in time, else by ending the idle call.
    new = Voice(mux, "sess_new")
    try:
        response = await asyncio.wait_for(anext(new.responses), 15)
        assert response.WhichOneof("kind") == "failure"
        assert response.failure.message.startswith("The broker is draining")
    except MuxBroken:
        pass
    assert len(await _realtime_log(sim)) == 1  # no upstream session for the refused one
    # ...and each call ends once its last session has.
    old.requests.put_nowait(None)
    async with asyncio.timeout(15):
        while mux._readers:
            await asyncio.sleep(0.02)


async def test_a_broken_call_fails_its_sessions_as_a_broken_session_call(
    served: tuple[Served, VoiceMux], sim: RunningSimulator
) -> None:
    _, mux = served
    voice = Voice(mux, "sess_a")
    await voice.events_until("session.created")
    for opened in list(mux._readers):
        opened.call.cancel()
    with pytest.raises(MuxBroken):
        await asyncio.wait_for(anext(voice.responses), 15)
    await _upstream_ended(sim, 1)  # the broker cancelled the session with the call
