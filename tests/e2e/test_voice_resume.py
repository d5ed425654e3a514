"""Resume of voice sessions (docs/voice.md#resume): a client whose socket dropped, or
whose gateway was killed, mid-reply resumes on another gateway process (which talks
to another broker process than the one holding the session) and gets the rest of the
reply: nothing lost or repeated, transcripts whole, the audio of the expected length.
And the hold's ends: a clean close ends the upstream at once, a hold that runs out
ends it too, and a resume after that is refused."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import websockets

from tests.e2e.conftest import RealtimeClient
from tests.voice_support import chunks, duration_ms, silence, speech
from tools.stack import Ports, Stack

VOICE = "gpt-realtime-voice"
PARIS = "what is the weather in Paris"
REPLY_MS = 3000
# A held voice session is closed this long after its gateway went away (30 s by default).
HOLD_S = 3


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(
        ports=Ports.free(),
        replicas=2,
        # 100 ms of reply audio every 40 ms: a 3 s reply streams for 1.2 s.
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "40"],
        extra_env={"SWITCHBOARD_BROKER_VOICE_HOLD_S": str(HOLD_S)},
    )
    with stack:
        yield stack


def open_voice(stack: Stack, gateway: int, **query: str) -> Any:
    port = stack.gateway_ports[gateway]
    params = "&".join(f"{k}={v}" for k, v in {"model": VOICE, **query}.items())
    return websockets.connect(
        f"ws://127.0.0.1:{port}/v1/realtime?{params}",
        additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
        max_size=None,
    )


def directive(**keys: Any) -> str:
    return f"[[sim {orjson.dumps(keys).decode()}]]"


def scrape(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and labels in line and not line.startswith("#")
    )


def broker_sessions(stack: Stack, outcome: str) -> float:
    """Voice sessions the first broker ended with `outcome`."""
    name = "switchboard_broker_realtime_sessions_total"
    return scrape(stack.ports.broker_metrics, name, f'outcome="{outcome}"')


async def eventually(check: Any, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.05)


async def start_reply(client: RealtimeClient) -> list[dict[str, Any]]:
    """Speak (in real time) and read until the reply's audio has begun."""
    session = {"type": "realtime", "instructions": directive(transcript=PARIS, audio_ms=REPLY_MS)}
    session["audio"] = {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}
    await client.send({"type": "session.update", "session": session})
    seen = await client.recv_until("session.updated")
    for chunk in chunks(silence(200) + speech(PARIS) + silence(400)):
        await client.send({"type": "input_audio_buffer.append", "audio": chunk})
        await asyncio.sleep(0.02)
    seen += await client.recv_until("response.output_audio.delta")
    for _ in range(3):
        seen += await client.recv_until("response.output_audio.delta")
    return seen


async def until_closed(client: RealtimeClient) -> list[dict[str, Any]]:
    """What arrives until the connection drops."""
    events = []
    try:
        while True:
            events.append(await client.recv())
    except websockets.exceptions.ConnectionClosed:
        return events


def assert_whole_reply(events: list[dict[str, Any]]) -> None:
    """One reply, every event once, its transcripts whole, its audio all there."""
    ids = [event["event_id"] for event in events]
    assert len(ids) == len(set(ids)), "an event id repeats"
    kinds = [event["type"] for event in events]
    assert kinds.count("response.created") == 1
    assert kinds.count("response.done") == 1
    transcription = events[kinds.index("conversation.item.input_audio_transcription.completed")]
    assert transcription["transcript"] == PARIS
    spoken = "".join(
        event["delta"]
        for event in events
        if event["type"] == "response.output_audio_transcript.delta"
    )
    said = events[kinds.index("response.output_audio_transcript.done")]["transcript"]
    assert spoken == said and said
    heard = b"".join(
        base64.b64decode(event["delta"])
        for event in events
        if event["type"] == "response.output_audio.delta"
    )
    assert duration_ms(heard) == REPLY_MS
    assert events[-1]["response"]["status"] == "completed"


def voice_usage(stack: Stack) -> tuple[int, int]:
    """The development tenant's voice responses and output tokens recorded today."""
    request = urllib.request.Request(
        f"{stack.gateway_url}/v1/usage", headers={"Authorization": f"Bearer {stack.dev_key}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        rows = [row for row in orjson.loads(answer.read())["data"] if row["model"] == VOICE]
    return sum(row["requests"] for row in rows), sum(row["output_tokens"] for row in rows)


async def test_a_dropped_socket_resumes_mid_reply_on_another_gateway(stack: Stack) -> None:
    requests, output_tokens = voice_usage(stack)
    async with open_voice(stack, 0) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        session_id = created["session"]["id"]
        seen = [created, *await start_reply(client)]
        # The network cuts: no close frame.
        connection.transport.abort()
    await asyncio.sleep(0.2)  # the reply goes on upstream meanwhile
    async with open_voice(
        stack, 1, session_id=session_id, last_event_id=seen[-1]["event_id"]
    ) as connection:
        client = RealtimeClient(connection)
        rest = await client.recv_until("response.done")
        assert rest[0]["type"] != "session.created"
        assert_whole_reply(seen + rest)
        usage = rest[-1]["response"]["usage"]
        # The resuming gateway settled the response it finished, once.
        settled = (requests + 1, output_tokens + usage["output_tokens"])
        await eventually(lambda: voice_usage(stack) == settled)
        # The session goes on: another turn on the same upstream session.
        await client.send({"type": "response.create"})
        again = await client.recv_until("response.done")
        assert again[-1]["response"]["status"] == "completed"


async def test_a_clean_close_ends_the_upstream_and_a_hold_that_runs_out_too(
    stack: Stack,
) -> None:
    # The sessions of earlier tests have ended (a closed socket ends its upstream
    # a moment later).
    active = "switchboard_broker_realtime_sessions_active"
    await eventually(lambda: scrape(stack.ports.broker_metrics, active) == 0)
    closed, expired = broker_sessions(stack, "closed"), broker_sessions(stack, "hold_expired")
    async with open_voice(stack, 0) as connection:
        await RealtimeClient(connection).recv()
    # A close frame (1000): the upstream session ends at once, not after the hold.
    await eventually(lambda: broker_sessions(stack, "closed") == closed + 1)
    assert broker_sessions(stack, "hold_expired") == expired

    async with open_voice(stack, 0) as connection:
        created = await RealtimeClient(connection).recv()
        connection.transport.abort()
    await eventually(lambda: broker_sessions(stack, "hold_expired") == expired + 1)
    assert broker_sessions(stack, "closed") == closed + 1
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with open_voice(
            stack, 1, session_id=created["session"]["id"], last_event_id=created["event_id"]
        ):
            pass
    assert refused.value.response.status_code == 410
    error = orjson.loads(refused.value.response.body or b"{}")["error"]
    assert error["code"] == "resume_unavailable"
    assert "no longer held" in error["message"]


async def test_bad_resumes_of_a_voice_session_are_refused(stack: Stack) -> None:
    async with open_voice(stack, 0) as connection:
        created = await RealtimeClient(connection).recv()
        session_id = created["session"]["id"]
        refusals = [
            ("sess_unknown", "", 404, "session_not_found"),
            (session_id, "not-an-event-id", 400, "invalid_value"),
            # Past the newest event: one the session never sent.
            (session_id, "event_v999", 410, "resume_unavailable"),
        ]
        for target, last_event_id, status, code in refusals:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with open_voice(stack, 1, session_id=target, last_event_id=last_event_id):
                    pass
            assert refused.value.response.status_code == status, (target, last_event_id)
            body = orjson.loads(refused.value.response.body or b"{}")
            assert body["error"]["code"] == code
        # None of it disturbed the session.
        await connection.send(orjson.dumps({"type": "response.create"}).decode())
        done = (await RealtimeClient(connection).recv_until("response.done"))[-1]
        assert done["response"]["status"] == "completed"


@pytest.fixture(scope="module")
def small_replay() -> Iterator[Stack]:
    """A stack whose brokers keep 40 kB of a voice session's events (about 0.6 s of audio)."""
    stack = Stack(
        ports=Ports.free(),
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "40"],
        extra_env={"SWITCHBOARD_BROKER_VOICE_REPLAY_MAX_BYTES": "40000"},
    )
    with stack:
        yield stack


async def test_a_resume_past_the_kept_audio_is_told_so_and_gets_the_rest_whole(
    small_replay: Stack,
) -> None:
    stack = small_replay
    async with open_voice(stack, 0) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        session = {"type": "realtime", "instructions": directive(audio_ms=REPLY_MS)}
        await client.send({"type": "session.update", "session": session})
        await client.recv_until("session.updated")
        await client.say("tell me about Paris")
        await client.send({"type": "response.create"})
        seen = await client.recv_until("response.output_audio.delta")
        connection.transport.abort()
    # The whole reply is sent upstream while the client is away.
    await eventually(lambda: sim_responses(stack)[-1]["outcome"] == "completed")
    async with open_voice(
        stack, 0, session_id=created["session"]["id"], last_event_id=seen[-1]["event_id"]
    ) as connection:
        client = RealtimeClient(connection)
        notice = await client.recv()
        assert notice["type"] == "error"
        assert notice["error"]["code"] == "resume_audio_lost"
        rest = await client.recv_until("response.done")
    events = [created, *seen, notice, *rest]
    ids = [event["event_id"] for event in events]
    assert len(ids) == len(set(ids))
    kinds = [event["type"] for event in rest]
    spoken = "".join(
        e["delta"] for e in rest if e["type"] == "response.output_audio_transcript.delta"
    )
    assert spoken == rest[kinds.index("response.output_audio_transcript.done")]["transcript"]
    heard = b"".join(
        base64.b64decode(e["delta"])
        for e in seen + rest
        if e["type"] == "response.output_audio.delta"
    )
    assert 0 < duration_ms(heard) < REPLY_MS
    assert rest[-1]["response"]["status"] == "completed"


def sim_responses(stack: Stack) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{stack.simulator_url}/_sim/realtime", timeout=5) as answer:
        sessions = orjson.loads(answer.read())["sessions"]
    responses: list[dict[str, Any]] = sessions[-1]["responses"] if sessions else []
    return responses or [{"outcome": "none"}]


async def test_a_killed_gateway_mid_reply_resumes_on_another(stack: Stack) -> None:
    async with open_voice(stack, 0) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        seen = [created, *await start_reply(client)]
        stack.services["gateway"].stop(kill=True)
        seen += await until_closed(client)
    try:
        async with open_voice(
            stack, 1, session_id=created["session"]["id"], last_event_id=seen[-1]["event_id"]
        ) as connection:
            rest = await RealtimeClient(connection).recv_until("response.done")
            assert_whole_reply(seen + rest)
    finally:
        stack.restart("gateway")
