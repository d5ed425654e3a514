"""The simulator's Realtime endpoint: the pure session core, then the real server
driven by the official `openai` SDK's realtime client with real speech."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import websockets

from tests.voice_support import chunks, silence, speech
from tools.simulator import RunningSimulator, SimulatorConfig, audio, run_simulator
from tools.simulator.voice import MS_PER_WORD, VoiceSession

KEY = "sk-sim-voice-key"
PARIS = '[[sim {"transcript": "what is the weather in Paris"}]]'


def session(**kwargs: Any) -> VoiceSession:
    return VoiceSession("sess_test", "gpt-realtime", ttfa_ms=0, chunk_delay_ms=0, **kwargs)


def feed(core: VoiceSession, pcm: bytes) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for chunk in chunks(pcm):
        reply = core.receive({"type": "input_audio_buffer.append", "audio": chunk})
        events += reply.events
        if reply.plan is not None:
            events += [step.event for step in reply.plan.steps]
            core.finished(reply.plan.response_id)
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def test_speech_then_silence_is_one_turn_with_a_spoken_reply() -> None:
    core = session()
    core.receive({"type": "session.update", "session": {"instructions": PARIS}})
    events = feed(core, silence(300) + speech("what is the weather in Paris") + silence(600))
    kinds = types(events)
    assert kinds.count("input_audio_buffer.speech_started") == 1
    assert kinds.count("input_audio_buffer.speech_stopped") == 1
    started = events[kinds.index("input_audio_buffer.speech_started")]
    assert started["audio_start_ms"] == 0  # 300 ms of silence minus the 300 ms prefix padding
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    transcript = events[kinds.index("response.output_audio_transcript.done")]["transcript"]
    assert transcript == 'turn 1: you said "what is the weather in Paris".'
    pcm = b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )
    words = len(transcript.split())
    assert audio.duration_ms("audio/pcm", len(pcm)) == words * MS_PER_WORD
    usage = events[-1]["response"]["usage"]
    assert usage["input_token_details"]["audio_tokens"] > 0
    assert usage["output_token_details"]["audio_tokens"] == words * MS_PER_WORD // 50
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_no_turn_detection_means_no_vad_events_and_a_manual_commit() -> None:
    core = session()
    update = {"audio": {"input": {"turn_detection": None, "transcription": {"model": "x"}}}}
    core.receive({"type": "session.update", "session": update})
    assert feed(core, speech("hello") + silence(600)) == []
    events = core.receive({"type": "input_audio_buffer.commit"}).events
    kinds = types(events)
    assert kinds[0] == "input_audio_buffer.committed"
    assert events[-1]["type"] == "conversation.item.input_audio_transcription.completed"
    assert events[-1]["transcript"].endswith("ms of speech")


def test_an_empty_commit_is_refused() -> None:
    error = session().receive({"type": "input_audio_buffer.commit"}).events[0]
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"


def test_speech_during_a_reply_cancels_it_and_truncate_cuts_the_item() -> None:
    core = session()
    core.receive({"type": "conversation.item.create", "item": user_text("hi")})
    reply = core.receive({"type": "response.create"})
    assert reply.plan is not None
    item_id = next(
        s.event["item"]["id"]
        for s in reply.plan.steps
        if s.event["type"] == "conversation.item.added"
    )
    events = feed(core, speech("stop"))
    assert types(events)[:2] == ["input_audio_buffer.speech_started", "response.done"]
    assert events[1]["response"]["status"] == "cancelled"
    assert events[1]["response"]["status_details"]["reason"] == "turn_detected"
    cut = core.receive(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 120,
        }
    )
    assert cut.events[0] == {
        "type": "conversation.item.truncated",
        "event_id": cut.events[0]["event_id"],
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": 120,
    }
    too_far = {"type": "conversation.item.truncate", "item_id": item_id, "audio_end_ms": 10**6}
    assert core.receive(too_far).events[0]["error"]["param"] == "audio_end_ms"


def user_text(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def test_a_directive_makes_a_function_call_and_its_output_is_spoken() -> None:
    core = session()
    calls = '[[sim {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]]'
    core.receive({"type": "conversation.item.create", "item": user_text("weather? " + calls)})
    plan = core.receive({"type": "response.create"}).plan
    assert plan is not None
    done = plan.steps[-1].event["response"]
    call = done["output"][0]
    assert (call["type"], call["name"], call["arguments"]) == (
        "function_call",
        "get_weather",
        '{"city":"Paris"}',
    )
    core.finished(plan.response_id)
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    core.receive({"type": "conversation.item.create", "item": output})
    plan = core.receive({"type": "response.create"}).plan
    assert plan is not None
    spoken = plan.steps[-1].event["response"]["output"][0]["content"][0]["transcript"]
    assert spoken == "tool get_weather returned sunny"


def test_g711_round_trip_keeps_the_level() -> None:
    for fmt in ("audio/pcmu", "audio/pcma"):
        tone = audio.tone(fmt, 100)
        assert len(tone) == 800
        levels = audio.frame_levels(fmt, tone)
        assert all(0.15 < level < 0.2 for level in levels), (fmt, levels)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=30, token_delay_ms=2, api_key=KEY)
    async with run_simulator(config) as running:
        yield running


async def test_the_openai_sdk_streams_speech_and_hears_a_reply(sim: RunningSimulator) -> None:
    client = openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": PARIS,
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            }
        )
        pcm = speech("what is the weather in Paris") + silence(500)
        for chunk in chunks(pcm):
            await connection.input_audio_buffer.append(audio=chunk)
        seen: list[str] = []
        heard = b""
        async for event in connection:
            seen.append(event.type)
            if event.type == "response.output_audio.delta":
                heard += base64.b64decode(event.delta)
            if event.type == "conversation.item.input_audio_transcription.completed":
                assert event.transcript == "what is the weather in Paris"
            if event.type == "response.done":
                assert event.response.status == "completed"
                break
    assert "input_audio_buffer.speech_stopped" in seen
    assert heard and len(heard) % 2 == 0
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/_sim/realtime") as answer:
        record = (await answer.json())["sessions"][-1]
    assert record["responses"][0]["outcome"] == "completed"
    assert record["client_events"]["input_audio_buffer.append"] == len(chunks(pcm))


async def test_a_wrong_key_is_refused_and_never_echoed(sim: RunningSimulator) -> None:
    client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong")
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await client.realtime.connect(model="gpt-realtime").enter()
    assert refused.value.response.status_code == 401
    assert "sk-wrong" not in str(refused.value) + refused.value.response.body.decode()


async def test_disconnect_after_cuts_the_socket_mid_reply(sim: RunningSimulator) -> None:
    client = openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY)
    cut = '[[sim {"disconnect_after": 2, "audio_ms": 1000}]]'
    async with client.realtime.connect(model="gpt-realtime") as connection:
        await connection.session.update(session={"type": "realtime", "instructions": cut})
        await connection.conversation.item.create(item=user_text("hi"))  # type: ignore[arg-type]
        await connection.response.create()
        deltas: list[str] = []
        with pytest.raises(websockets.exceptions.ConnectionClosedError):
            await asyncio.wait_for(_collect(connection, deltas), 5)
    assert len(deltas) == 2


async def _collect(connection: Any, deltas: list[str]) -> None:
    async for event in connection:
        if event.type == "response.output_audio.delta":
            deltas.append(event.delta)


async def test_session_limit_s_ends_the_session_as_openai_does(sim: RunningSimulator) -> None:
    url = sim.base_url.replace("http", "ws", 1) + "/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {KEY}"}
    limit = '[[sim {"session_limit_s": 0.2}]]'
    async with websockets.connect(url, additional_headers=headers) as socket:
        update = {"type": "session.update", "session": {"instructions": limit}}
        await socket.send(json.dumps(update))
        events = [json.loads(await asyncio.wait_for(socket.recv(), 5)) for _ in range(3)]
        with pytest.raises(websockets.exceptions.ConnectionClosedOK) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert types(events) == ["session.created", "session.updated", "error"]
    error = events[-1]["error"]
    assert (error["type"], error["code"], error["event_id"]) == (
        "invalid_request_error",
        "session_expired",
        None,
    )
    assert error["message"] == "Your session hit the maximum duration of 0.2 seconds."
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, error["message"])


def test_echo_context_names_what_the_session_holds_in_order() -> None:
    core = session()
    core.receive(
        {"type": "session.update", "session": {"instructions": '[[sim {"echo_context": true}]]'}}
    )
    core.receive({"type": "conversation.item.create", "item": {"id": "b", **user_text("two")}})
    first = {"id": "a", **user_text("one")}
    core.receive({"type": "conversation.item.create", "previous_item_id": "root", "item": first})
    answer = {
        "id": "c",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "ok"}],
    }
    added = core.receive(
        {"type": "conversation.item.create", "previous_item_id": "a", "item": answer}
    ).events[0]
    assert added["previous_item_id"] == "a"
    core.receive({"type": "conversation.item.create", "item": user_text("three")})
    reply = core.receive({"type": "response.create"})
    assert reply.plan is not None
    done = next(s.event for s in reply.plan.steps if s.event["type"] == "response.done")
    text = done["response"]["output"][0]["content"][0]["transcript"]
    assert text == 'turn 3: you said "three". context=[user "one", assistant "ok", user "two"]'


async def test_stamp_audio_gives_each_delta_its_send_time(sim: RunningSimulator) -> None:
    url = sim.base_url.replace("http", "ws", 1) + "/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {KEY}"}
    for stamped in (True, False):
        directive = json.dumps({"audio_ms": 300, "stamp_audio": stamped})
        async with websockets.connect(url, additional_headers=headers) as socket:
            update = {"type": "session.update", "session": {"instructions": f"[[sim {directive}]]"}}
            await socket.send(json.dumps(update))
            await socket.send(
                json.dumps({"type": "conversation.item.create", "item": user_text("hi")})
            )
            await socket.send(json.dumps({"type": "response.create"}))
            deltas: list[tuple[float, dict[str, Any]]] = []
            while True:
                event = json.loads(await asyncio.wait_for(socket.recv(), 5))
                if event["type"] == "response.output_audio.delta":
                    deltas.append((time.monotonic(), event))
                if event["type"] == "response.done":
                    break
        assert len(deltas) == 3
        if not stamped:
            assert all("sim_sent_at" not in event for _, event in deltas)
            continue
        sent = [event["sim_sent_at"] for _, event in deltas]
        assert sent == sorted(sent)
        # The same clock as this process's: each was sent before it arrived.
        assert all(0 <= received - event["sim_sent_at"] < 5 for received, event in deltas)
