"""Voice sessions at the broker: RealtimeService over real gRPC to the simulator's
Realtime WebSocket, with the development tenant's `gpt-realtime-voice` model."""

from __future__ import annotations

import asyncio
import base64
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
        # Events read past what `events_until` returned, for its next call.
        self.pending: list[dict[str, Any]] = []

    async def _requests(self) -> AsyncIterator[R.RealtimeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def open(self, model: str = VOICE, session: dict[str, Any] | None = None) -> None:
        body = orjson.dumps(session).decode() if session else ""
        opening = R.RealtimeOpen(
            tenant_id=DEV_TENANT, session_id="sess_v1", model=model, session_json=body
        )
        self.requests.put_nowait(R.RealtimeRequest(open=opening))

    def attach(self, after_seq: int, session_id: str = "sess_v1") -> None:
        attach = R.RealtimeAttach(tenant_id=DEV_TENANT, session_id=session_id, after_seq=after_seq)
        self.requests.put_nowait(R.RealtimeRequest(attach=attach))

    def send(self, *events: dict[str, Any]) -> None:
        batch = R.RealtimeEvents(events=[orjson.dumps(event) for event in events])
        self.requests.put_nowait(R.RealtimeRequest(events=batch))

    async def next(self) -> R.RealtimeResponse:
        response = await asyncio.wait_for(self.call.read(), 10)
        assert response is not None
        return response

    async def events_until(self, kind: str) -> list[dict[str, Any]]:
        """The events up to the first of `kind`, inclusive.

        One `events` response carries what the upstream sent while the broker
        was writing the previous one: on a busy machine a batch may run past
        `kind` (to the `response.done`, with nothing after it). The events past
        it are kept for the next call.
        """
        seen, self.pending = self.pending, []
        while not any(event["type"] == kind for event in seen):
            response = await self.next()
            assert response.WhichOneof("kind") == "events", response
            seen += [orjson.loads(event) for event in response.events.events]
        end = next(at for at, event in enumerate(seen) if event["type"] == kind) + 1
        self.pending = seen[end:]
        return seen[:end]


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


async def _upstream_closed(sim: RunningSimulator) -> None:
    """Wait until the simulator's last Realtime session has ended."""
    async with asyncio.timeout(5):
        while (await _realtime_log(sim))[-1]["ended_at"] is None:
            await asyncio.sleep(0.02)


async def _attach_refused(stub: Any) -> int:
    """The failure code of an attach to the session after its first event."""
    late = Session(stub)
    late.attach(1)
    failure = (await late.next()).failure
    return int(failure.code)


async def _realtime_log(sim: RunningSimulator) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/_sim/realtime") as answer:
        sessions: list[dict[str, Any]] = (await answer.json())["sessions"]
        return sessions


async def test_a_close_closes_the_upstream_socket_at_once(
    broker: Any, sim: RunningSimulator
) -> None:
    stub, served = broker
    session = Session(stub)
    session.open()
    await session.next()
    await session.events_until("session.created")
    session.requests.put_nowait(R.RealtimeRequest(close=R.RealtimeClose()))
    assert await asyncio.wait_for(session.call.read(), 5) is grpc.aio.EOF
    await _upstream_closed(sim)
    assert len(served.servicer.realtime.held) == 0
    # A closed session is not held: an attach is refused.
    assert await _attach_refused(stub) == common_pb2.ERROR_CODE_RESUME_UNAVAILABLE


async def test_a_session_whose_caller_left_is_held_and_an_attach_replays_the_rest(
    broker: Any, sim: RunningSimulator
) -> None:
    stub, served = broker
    first = Session(stub)
    first.open(session={"instructions": '[[sim {"audio_ms": 1500}]]'})
    await first.next()
    seen = await first.events_until("session.created")
    first.send({"type": "conversation.item.create", "item": user_text("hi")})
    first.send({"type": "response.create"})
    seen += await first.events_until("response.output_audio.delta")
    # The gateway dies: its call ends without a close.
    first.call.cancel()
    await asyncio.sleep(0.3)
    assert (await _realtime_log(sim))[-1]["ended_at"] is None
    registry = served.servicer.metrics.registry
    assert registry.get_sample_value("switchboard_broker_realtime_held_sessions_active") == 1
    # Its client saw all but the last two events.
    client_saw = seen[:-2]
    after = int(client_saw[-1]["event_id"].removeprefix("event_v"), 16)
    resumed = Session(stub)
    resumed.attach(after)
    attached = (await resumed.next()).attached
    assert attached.upstream == "realtime"
    assert attached.delivered_seq >= len(seen)
    assert attached.last_seq >= len(seen)
    assert not attached.audio_lost
    assert orjson.loads(attached.session_event)["type"] == "session.created"
    rest = await resumed.events_until("response.done")
    ids = [event["event_id"] for event in client_saw + rest]
    # Numbered 1, 2, ... with nothing lost or repeated across the resume.
    assert ids == [f"event_v{seq:x}" for seq in range(1, len(ids) + 1)]
    assert rest[-1]["response"]["status"] == "completed"
    audio_ms = sum(
        len(base64.b64decode(event["delta"])) // 48
        for event in client_saw + rest
        if event["type"] == "response.output_audio.delta"
    )
    assert audio_ms == 1500
    # A second attach takes the session over: the first attached caller is told.
    third = Session(stub)
    third.attach(int(ids[-1].removeprefix("event_v"), 16))
    assert (await third.next()).WhichOneof("kind") == "attached"
    failure = (await resumed.next()).failure
    assert failure.code == common_pb2.ERROR_CODE_SESSION_TAKEN_OVER
    third.requests.put_nowait(R.RealtimeRequest(close=R.RealtimeClose()))
    assert await asyncio.wait_for(third.call.read(), 5) is grpc.aio.EOF


async def test_an_attach_to_what_the_broker_does_not_hold_is_refused(broker: Any) -> None:
    stub, _ = broker
    unknown = Session(stub)
    unknown.attach(1, session_id="sess_unknown")
    failure = (await unknown.next()).failure
    assert failure.code == common_pb2.ERROR_CODE_RESUME_UNAVAILABLE
    session = Session(stub)
    session.open()
    await session.next()
    await session.events_until("session.created")
    session.call.cancel()
    beyond = Session(stub)
    beyond.attach(99)
    failure = (await beyond.next()).failure
    assert (failure.code, failure.param) == (
        common_pb2.ERROR_CODE_RESUME_UNAVAILABLE,
        "last_event_id",
    )
    assert "never sent" in failure.message


async def test_a_held_session_is_closed_when_its_hold_runs_out(sim: RunningSimulator) -> None:
    env = dev_env(
        sim.base_url,
        SWITCHBOARD_BROKER_REALTIME_URL=sim.base_url,
        SWITCHBOARD_BROKER_VOICE_HOLD_S="0.3",
    )
    async with serving_channel(env) as (served, channel):
        stub = realtime_pb2_grpc.RealtimeServiceStub(channel)
        session = Session(stub)
        session.open()
        await session.next()
        await session.events_until("session.created")
        session.call.cancel()
        await _upstream_closed(sim)
        ended = served.servicer.metrics.registry.get_sample_value(
            "switchboard_broker_realtime_sessions_total",
            {"upstream": "realtime", "outcome": "hold_expired"},
        )
        assert ended == 1
        assert await _attach_refused(stub) == common_pb2.ERROR_CODE_RESUME_UNAVAILABLE


async def test_audio_over_the_replay_bound_is_given_up_first_and_the_attach_says_so(
    sim: RunningSimulator,
) -> None:
    env = dev_env(
        sim.base_url,
        SWITCHBOARD_BROKER_REALTIME_URL=sim.base_url,
        SWITCHBOARD_BROKER_VOICE_REPLAY_MAX_BYTES="40000",
    )
    async with serving_channel(env) as (_, channel):
        stub = realtime_pb2_grpc.RealtimeServiceStub(channel)
        first = Session(stub)
        first.open(session={"instructions": '[[sim {"audio_ms": 3000}]]'})
        await first.next()
        seen = await first.events_until("session.created")
        first.send({"type": "conversation.item.create", "item": user_text("hi")})
        first.send({"type": "response.create"})
        seen += await first.events_until("response.output_audio.delta")
        first.call.cancel()
        async with asyncio.timeout(10):
            while (await _realtime_log(sim))[-1]["responses"][-1]["outcome"] != "completed":
                await asyncio.sleep(0.02)
        # From the first audio delta (the last event the client saw).
        first_audio = seen[-1]
        resumed = Session(stub)
        resumed.attach(int(first_audio["event_id"].removeprefix("event_v"), 16))
        assert (await resumed.next()).attached.audio_lost
        rest = await resumed.events_until("response.done")
        kinds = [event["type"] for event in rest]
        # 6.4 kB an audio delta (100 ms): most of the reply's 30 did not fit in 40 kB.
        assert 0 < kinds.count("response.output_audio.delta") < 29
        # Everything else is whole: the transcript (its first delta may have come
        # before the audio the client stopped at), the item, the response's end.
        before = seen[: seen.index(first_audio)]
        spoken = "".join(
            e["delta"]
            for e in before + rest
            if e["type"] == "response.output_audio_transcript.delta"
        )
        said = rest[kinds.index("response.output_audio_transcript.done")]["transcript"]
        assert spoken == said and said
        assert "response.output_item.done" in kinds
        assert rest[-1]["response"]["status"] == "completed"


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
