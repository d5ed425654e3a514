"""Session rollover: a voice session outlives upstream sessions that end after a
few seconds (the simulator's `session_limit_s`, OpenAI's 60-minute limit made
short), through the real gateway, broker and simulator (docs/voice.md#session-rollover)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import websockets

from switchboard.broker.realtime_carry import UNTRANSCRIBED
from switchboard.tenancy import hash_key
from tests.e2e.conftest import RealtimeClient, assert_no_secret_leaks
from tests.voice_support import chunks, silence, speech
from tools.stack import Ports, Stack

KEY = "sk-sb-voice-rollover-tenant-0001"
LIMIT_S = 6
# The broker starts looking for a pause 2 s into each upstream session; the
# simulator ends a session LIMIT_S after its first session.update.
MARGIN_S = 4
SIM = orjson.dumps({"session_limit_s": LIMIT_S, "echo_context": True}).decode()
TENANTS = """
upstreams:
  realtime:
    kind: realtime
    base_url: http://127.0.0.1:{simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
    rollover: {{session_limit_s: {limit}, margin_s: {margin}}}
tenants:
  talk:
    keys: ["{key}"]
    models:
      voice: {{upstream: realtime, upstream_model: gpt-realtime}}
    session: {{model: voice, instructions: {instructions}}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    instructions = orjson.dumps(f"Remember. [[sim {SIM}]]").decode()
    tenants.write_text(
        TENANTS.format(
            simulator=ports.simulator,
            key=hash_key(KEY),
            limit=LIMIT_S,
            margin=MARGIN_S,
            instructions=instructions,
        )
    )
    stack = Stack(ports=ports, extra_env={"SWITCHBOARD_TENANTS_FILE": str(tenants)})
    with stack:
        yield stack
    assert_no_secret_leaks(stack)


@pytest.fixture
async def voice(stack: Stack) -> AsyncIterator[RealtimeClient]:
    url = f"{stack.websocket_url}?model=voice"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as socket:
        client = RealtimeClient(socket)
        created = await client.recv()
        assert created["type"] == "session.created"
        yield client


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as answer:
        body: bytes = answer.read()
        return body


def rollovers(stack: Stack, outcome: str) -> float:
    text = _get(f"http://127.0.0.1:{stack.ports.broker_metrics}/metrics").decode()
    wanted = (
        f'switchboard_broker_realtime_rollovers_total{{outcome="{outcome}",upstream="realtime"}}'
    )
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted)
    )


async def rolled_over(stack: Stack, outcome: str, before: float, timeout_s: float = 20) -> None:
    """Wait until the broker counts one more rollover of `outcome` than `before`."""
    deadline = time.monotonic() + timeout_s
    while rollovers(stack, outcome) <= before:
        assert time.monotonic() < deadline, f"no {outcome} rollover"
        await asyncio.sleep(0.05)


def sim_sessions(stack: Stack) -> list[dict[str, Any]]:
    sessions: list[dict[str, Any]] = orjson.loads(_get(f"{stack.simulator_url}/_sim/realtime"))[
        "sessions"
    ]
    return sessions


async def ended_sessions(
    stack: Stack, first: int, upto: int | None = None, timeout_s: float = 20
) -> list[dict[str, Any]]:
    """The simulator's upstream sessions `first:upto`, once none is open."""
    deadline = time.monotonic() + timeout_s
    while True:
        mine = sim_sessions(stack)[first:upto]
        if all(s["outcome"] != "in_progress" for s in mine):
            return mine
        assert time.monotonic() < deadline, [s["outcome"] for s in mine]
        await asyncio.sleep(0.05)


def configure_simulator(stack: Stack, overrides: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{stack.simulator_url}/_sim/config",
        data=orjson.dumps(overrides),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=5).close()


async def turn(voice: RealtimeClient, text: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Say `text`, get a spoken reply; the reply's `response.done`."""
    seen.append(await voice.say(text))
    events = await voice.respond()
    seen.extend(events)
    return events[-1]["response"]


def transcript(response: dict[str, Any]) -> str:
    return str(response["output"][0]["content"][0]["transcript"])


async def test_a_conversation_goes_on_across_two_rollovers(
    stack: Stack, voice: RealtimeClient
) -> None:
    seen: list[dict[str, Any]] = []
    sessions_before = len(sim_sessions(stack)) - 1  # the fixture's session is open
    completed = rollovers(stack, "completed")
    first = await turn(voice, "one", seen)
    assert transcript(first) == 'turn 1: you said "one". context=[]'
    user_one = seen[0]["item"]["id"]
    assistant_one = first["output"][0]["id"]

    await rolled_over(stack, "completed", completed)
    second = await turn(voice, "two", seen)
    # The new upstream session holds the first turn: the user's words and the
    # assistant's spoken reply, carried as its transcript.
    assert transcript(second) == (
        'turn 2: you said "two". context=[user "one", '
        'assistant "turn 1: you said "one". context=[]"]'
    )

    await rolled_over(stack, "completed", completed + 1)
    third = await turn(voice, "three", seen)
    assert transcript(third).startswith('turn 3: you said "three". context=[user "one", ')
    assert 'user "two"' in transcript(third)

    # Ids from before both rollovers still name their items.
    await voice.send({"type": "conversation.item.retrieve", "item_id": user_one})
    retrieved = (await voice.recv_until("conversation.item.retrieved"))[-1]
    seen.append(retrieved)
    assert retrieved["item"]["id"] == user_one
    await voice.send(
        {
            "type": "conversation.item.truncate",
            "event_id": "evt_cut",
            "item_id": assistant_one,
            "content_index": 0,
            "audio_end_ms": 150,
        }
    )
    truncated = (await voice.recv_until("conversation.item.truncated"))[-1]
    seen.append(truncated)
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (assistant_one, 150)
    fourth = await turn(voice, "four", seen)
    # The truncated reply is empty upstream, in its place.
    assert transcript(fourth).startswith(
        'turn 4: you said "four". context=[user "one", assistant "", user "two"'
    )

    kinds = [event["type"] for event in seen]
    assert "session.created" not in kinds
    assert "error" not in kinds
    # Three upstream sessions (or more), each closed by the broker before its
    # limit: the replaced ones at their rollover, the last as the client leaves.
    # (The broker closes a replaced session after the swap, and the next rollover
    # may be under way: a session may still be open until the client leaves.)
    await voice.connection.close()
    mine = await ended_sessions(stack, sessions_before)
    assert len(mine) >= 3
    assert {s["outcome"] for s in mine} == {"closed"}


async def test_a_session_update_made_before_a_rollover_still_applies_after_it(
    stack: Stack, voice: RealtimeClient
) -> None:
    completed = rollovers(stack, "completed")
    short = orjson.dumps({"session_limit_s": LIMIT_S, "audio_ms": 300}).decode()
    await voice.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": f"Be brief. [[sim {short}]]",
                "audio": {"output": {"voice": "verse"}},
            },
        }
    )
    await voice.recv_until("session.updated")
    await rolled_over(stack, "completed", completed)
    seen: list[dict[str, Any]] = []
    done = await turn(voice, "hello", seen)
    assert done["audio"]["output"]["voice"] == "verse"
    # 300 ms of reply audio (the instructions' directive): 6 output audio tokens.
    assert done["usage"]["output_token_details"]["audio_tokens"] == 6
    assert "session.created" not in [event["type"] for event in seen]


async def test_a_new_session_that_cannot_open_keeps_the_old_one_until_its_limit(
    stack: Stack, voice: RealtimeClient
) -> None:
    failed = rollovers(stack, "failed")
    seen: list[dict[str, Any]] = []
    await turn(voice, "one", seen)
    configure_simulator(stack, {"status": 503})  # every new upstream session is refused
    try:
        await rolled_over(stack, "failed", failed)
        # The old upstream session goes on, with its conversation.
        second = await turn(voice, "two", seen)
        assert transcript(second).startswith('turn 2: you said "two".')
        # At its limit it ends as without rollover: the upstream's error, then ours.
        events = await voice.recv_until("error", timeout_s=LIMIT_S + 10)
        assert events[-1]["error"]["code"] == "session_expired"
        broken = (await voice.recv_until("error"))[-1]["error"]
        assert broken["code"] == "upstream_stream_broken"
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await voice.recv()
        assert voice.connection.close_code == 1011
    finally:
        configure_simulator(stack, {})
    assert rollovers(stack, "failed") > failed


async def speak(voice: RealtimeClient, text: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream espeak-ng speech of `text` in real time; the reply's `response.done`."""
    for chunk in chunks(silence(200) + speech(text) + silence(400)):
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
        await asyncio.sleep(0.02)
    events = await voice.recv_until("response.done", timeout_s=30)
    seen.extend(events)
    return events[-1]["response"]


async def test_spoken_turns_are_carried_as_their_transcripts(
    stack: Stack, voice: RealtimeClient
) -> None:
    directive = orjson.dumps(
        {"session_limit_s": LIMIT_S, "echo_context": True, "transcript": "good morning"}
    ).decode()
    await voice.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": f"[[sim {directive}]]",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            },
        }
    )
    await voice.recv_until("session.updated")
    seen: list[dict[str, Any]] = []
    first = await speak(voice, "good morning", seen)
    assert transcript(first).startswith('turn 1: you said "good morning".')
    # Transcription off: the next spoken turn has no transcript to carry.
    off = {"audio": {"input": {"transcription": None}}}
    await voice.send({"type": "session.update", "session": {"type": "realtime", **off}})
    await voice.recv_until("session.updated")
    await speak(voice, "good morning", seen)
    await rolled_over(stack, "completed", rollovers(stack, "completed"))
    third = await turn(voice, "and now", seen)
    assert transcript(third).startswith(
        'turn 3: you said "and now". context=[user "good morning", '
    )
    assert f'user "{UNTRANSCRIBED}"' in transcript(third), transcript(third)
    kinds = [event["type"] for event in seen]
    assert kinds.count("input_audio_buffer.speech_started") == 2
    assert "error" not in kinds


async def test_a_response_running_when_the_rollover_is_due_is_not_cut(
    stack: Stack, voice: RealtimeClient
) -> None:
    # The first audio comes 2.5 s after response.created: the rollover, due
    # 2 s after the upstream session opened, waits for its response.done.
    late = orjson.dumps({"session_limit_s": LIMIT_S, "ttfa_ms": 2500, "audio_ms": 400}).decode()
    await voice.send(
        {
            "type": "session.update",
            "session": {"type": "realtime", "instructions": f"[[sim {late}]]"},
        }
    )
    await voice.recv_until("session.updated")
    completed = rollovers(stack, "completed")
    seen: list[dict[str, Any]] = []
    done = await turn(voice, "tell me", seen)
    assert done["status"] == "completed"
    assert [e["type"] for e in seen].count("response.output_audio.delta") == 4
    await rolled_over(stack, "completed", completed)
    # The response ran whole on the first upstream session, which the broker
    # closed after it (in a task, after the swap it counts).
    first = next(
        i
        for i, s in enumerate(sim_sessions(stack))
        if any(r["id"] == done["id"] for r in s["responses"])
    )
    record = (await ended_sessions(stack, first, upto=first + 1))[0]
    assert record["outcome"] == "closed"
    assert [r["outcome"] for r in record["responses"]] == ["completed"]


async def test_audio_streamed_across_a_rollover_reaches_exactly_one_upstream_session(
    stack: Stack, voice: RealtimeClient
) -> None:
    # Silence from a microphone keeps coming while the sockets are swapped:
    # every chunk reaches the old session or the new one, none is lost or sent twice.
    sessions_before = len(sim_sessions(stack)) - 1
    completed = rollovers(stack, "completed")
    chunk = chunks(silence(20))[0]
    sent = 0
    while rollovers(stack, "completed") == completed or sent < 50:
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
        sent += 1
        await asyncio.sleep(0.02)
        assert sent < 1500, "no rollover"
    for _ in range(25):
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
        sent += 1
        await asyncio.sleep(0.02)
    # The clear is answered once the session has taken every chunk before it.
    await voice.send({"type": "input_audio_buffer.clear"})
    events = await voice.recv_until("input_audio_buffer.cleared")
    assert "error" not in [event["type"] for event in events]
    mine = sim_sessions(stack)[sessions_before:]
    assert len(mine) >= 2
    assert sum(s["audio_in_bytes"] for s in mine) == sent * len(silence(20))
