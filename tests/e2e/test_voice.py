"""Voice sessions end to end: real speech (espeak-ng, sox) through the real gateway,
broker and the simulator's Realtime endpoint, with the official `openai` SDK and a
raw WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
import websockets

from tests.e2e.conftest import RealtimeClient
from tests.voice_support import chunks, duration_ms, silence, speech
from tools.simulator.voice import MS_PER_WORD
from tools.stack import SIMULATOR_KEY, Stack

VOICE = "gpt-realtime-voice"
PARIS = "what is the weather in Paris"


def sdk(stack: Stack, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key or stack.dev_key,
        base_url=f"{stack.gateway_url}/v1",
        websocket_base_url=f"ws://127.0.0.1:{stack.ports.gateway}/v1",
    )


def directive(**keys: Any) -> str:
    return f"[[sim {orjson.dumps(keys).decode()}]]"


@pytest.fixture
async def voice(stack: Stack) -> AsyncIterator[RealtimeClient]:
    headers = {"Authorization": f"Bearer {stack.dev_key}"}
    url = f"{stack.websocket_url}?model={VOICE}"
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as connection:
        client = RealtimeClient(connection)
        created = await client.recv()
        assert created["type"] == "session.created"
        assert created["session"]["model"] == VOICE
        yield client


def sim_log(stack: Stack) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{stack.simulator_url}/_sim/realtime", timeout=5) as answer:
        sessions: list[dict[str, Any]] = orjson.loads(answer.read())["sessions"]
        return sessions


def metric(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(f"{stack.gateway_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def no_secrets(events: list[Any], stack: Stack) -> None:
    """No event names the upstream's URL or key (audio deltas are noise, left out)."""
    for event in events:
        if event["type"] == "response.output_audio.delta":
            continue
        text = orjson.dumps(event).decode()
        assert SIMULATOR_KEY not in text
        assert stack.simulator_url not in text and f":{stack.ports.simulator}/" not in text


async def test_the_openai_sdk_speaks_and_hears_a_reply_then_a_tool_turn(stack: Stack) -> None:
    audio_before = metric(stack, 'switchboard_gateway_voice_audio_seconds_total{direction="input"}')
    client = sdk(stack)
    seen: list[Any] = []
    async with client.realtime.connect(model=VOICE) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        assert created.session.model == VOICE  # type: ignore[union-attr]
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": directive(transcript=PARIS),
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            }
        )
        pcm = silence(200) + speech(PARIS) + silence(400)
        for chunk in chunks(pcm):  # 20 ms chunks in real time
            await connection.input_audio_buffer.append(audio=chunk)
            await asyncio.sleep(0.02)
        heard = b""
        async for event in connection:
            seen.append(event.to_dict())
            if event.type == "response.output_audio.delta":
                heard += base64.b64decode(event.delta)
            if event.type == "response.done":
                break
        kinds = [event["type"] for event in seen]
        for kind in (
            "session.updated",
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
            "response.output_audio_transcript.done",
        ):
            assert kind in kinds, kind
        transcription = seen[kinds.index("conversation.item.input_audio_transcription.completed")]
        assert transcription["transcript"] == PARIS
        reply = seen[kinds.index("response.output_audio_transcript.done")]["transcript"]
        assert reply == f'turn 1: you said "{PARIS}".'
        assert duration_ms(heard) == len(reply.split()) * MS_PER_WORD
        done = seen[-1]["response"]
        assert done["status"] == "completed"
        assert done["usage"]["input_token_details"]["audio_tokens"] > 0
        assert done["usage"]["output_token_details"]["audio_tokens"] > 0

        # A tool turn by voice: the model calls a function, the client answers it.
        calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": directive(transcript=PARIS, tool_calls=calls),
            }
        )
        for chunk in chunks(speech(PARIS) + silence(400)):
            await connection.input_audio_buffer.append(audio=chunk)
        call = None
        async for event in connection:
            seen.append(event.to_dict())
            if event.type == "response.done":
                call = event.response.output[0]  # type: ignore[index]
                break
        assert call is not None and call.type == "function_call"
        assert (call.name, call.arguments) == ("get_weather", '{"city":"Paris"}')  # type: ignore[union-attr]
        await connection.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}  # type: ignore[union-attr]
        )
        await connection.response.create()
        async for event in connection:
            seen.append(event.to_dict())
            if event.type == "response.output_audio_transcript.done":
                assert event.transcript == "tool get_weather returned sunny"
            if event.type == "response.done":
                assert event.response.status == "completed"
                break
    await client.close()
    no_secrets(seen, stack)
    after = metric(stack, 'switchboard_gateway_voice_audio_seconds_total{direction="input"}')
    assert after - audio_before >= duration_ms(pcm) / 1000 - 0.05
    assert metric(stack, "switchboard_gateway_voice_time_to_first_audio_seconds_count") >= 1


async def test_speech_during_a_reply_interrupts_it_and_truncate_cuts_it(
    stack: Stack, voice: RealtimeClient
) -> None:
    interruptions = metric(stack, "switchboard_gateway_voice_interruptions_total")
    await voice.send(
        {
            "type": "session.update",
            "session": {"type": "realtime", "instructions": directive(audio_ms=60000)},
        }
    )
    await voice.recv_until("session.updated")
    await voice.say("tell me a long story")
    await voice.send({"type": "response.create"})
    events = await voice.recv_until("response.output_audio.delta")
    item_id = events[-1]["item_id"]
    for chunk in chunks(speech("stop")):
        await voice.send({"type": "input_audio_buffer.append", "audio": chunk})
    events += await voice.recv_until("response.done")
    kinds = [event["type"] for event in events]
    assert "input_audio_buffer.speech_started" in kinds
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "turn_detected"
    received = kinds.count("response.output_audio.delta")
    # The upstream stopped: it sent no more audio than the client got.
    record = sim_log(stack)[-1]
    response = next(r for r in record["responses"] if r["id"] == done["id"])
    assert response["outcome"] == "cancelled"
    assert response["audio_deltas"] == received
    await voice.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 300,
        }
    )
    truncated = (await voice.recv_until("conversation.item.truncated"))[-1]
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 300)
    assert metric(stack, "switchboard_gateway_voice_interruptions_total") == interruptions + 1


async def test_bad_audio_gets_specific_errors_and_the_session_goes_on(
    voice: RealtimeClient,
) -> None:
    async def refused(event: dict[str, Any]) -> dict[str, Any]:
        await voice.send({**event, "event_id": "evt_bad"})
        error = (await voice.recv_until("error"))[-1]["error"]
        assert error["event_id"] == "evt_bad"
        return dict(error)

    append = {"type": "input_audio_buffer.append"}
    error = await refused({**append, "audio": "not base64!"})
    assert (error["code"], error["param"]) == ("invalid_audio", "audio")
    error = await refused({**append, "audio": base64.b64encode(b"\x00\x01\x02").decode()})
    assert error["code"] == "invalid_audio"
    error = await refused(
        {
            "type": "session.update",
            "session": {"audio": {"input": {"format": {"type": "audio/mp3"}}}},
        }
    )
    assert (error["code"], error["param"]) == ("invalid_value", "session.audio.input.format")
    error = await refused(
        {"type": "session.update", "session": {"audio": {"output": {"voice": "robot"}}}}
    )
    assert error["param"] == "session.audio.output.voice"
    error = await refused({"type": "conversation.item.truncate", "item_id": "item_x"})
    assert (error["code"], error["param"]) == ("missing_required_parameter", "content_index")
    error = await refused({"type": "session.update", "session": {"model": "gpt-realtime"}})
    assert error["param"] == "session.model"
    # 2.5 s of silence a chunk, at once: past the 10 s burst, the rate bound says so.
    big = base64.b64encode(silence(2500)).decode()
    for _ in range(4):
        await voice.send({**append, "audio": big})
    error = await refused({**append, "audio": big})
    assert error["code"] == "audio_rate_exceeded"
    # The session goes on: the buffer holds what was accepted, and commits.
    await voice.send({"type": "input_audio_buffer.commit"})
    committed = (await voice.recv_until("input_audio_buffer.committed"))[-1]
    assert committed["item_id"]


async def test_audio_events_in_a_text_session_are_unsupported(client: RealtimeClient) -> None:
    await client.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
    error = (await client.recv_until("error"))[-1]["error"]
    assert (error["code"], error["param"]) == ("unsupported_feature", "type")


async def test_an_ephemeral_secret_locks_a_voice_sessions_fields(stack: Stack) -> None:
    client = sdk(stack)
    secret = await client.realtime.client_secrets.create(
        session={"type": "realtime", "model": VOICE, "instructions": "Only weather."}
    )
    await client.close()
    browser = sdk(stack, secret.value)
    async with browser.realtime.connect(model=VOICE) as connection:
        created = await connection.recv()
        assert created.session.instructions == "Only weather."  # type: ignore[union-attr]
        await connection.session.update(session={"type": "realtime", "instructions": "Anything."})
        error = await connection.recv()
        assert error.type == "error"
        assert (error.error.code, error.error.param) == ("field_locked", "session.instructions")  # type: ignore[union-attr]
    await browser.close()


async def test_a_text_session_reports_no_turn_detection(client: RealtimeClient) -> None:
    # The Agents SDK skips response.cancel on interrupt when the session says the
    # server interrupts: a text session must not claim voice it does not serve.
    vad = {"type": "server_vad", "interrupt_response": True, "create_response": True}
    audio = {"input": {"turn_detection": vad, "transcription": {"model": "x"}}}
    await client.send({"type": "session.update", "session": {"type": "realtime", "audio": audio}})
    updated = (await client.recv_until("session.updated"))[-1]["session"]
    assert updated["output_modalities"] == ["text"]
    assert updated["audio"]["input"]["turn_detection"] is None
    assert updated["audio"]["input"]["transcription"] is None


async def test_an_upstream_that_drops_the_session_ends_it_with_a_clear_error(
    stack: Stack, voice: RealtimeClient
) -> None:
    cut = directive(disconnect_after=1)
    await voice.send({"type": "session.update", "session": {"instructions": cut}})
    await voice.recv_until("session.updated")
    await voice.say("hi")
    await voice.send({"type": "response.create"})
    error = (await voice.recv_until("error"))[-1]["error"]
    assert error["code"] == "upstream_stream_broken"
    assert stack.simulator_url not in error["message"]
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await voice.recv()
    assert voice.connection.close_code == 1011
    assert voice.connection.close_reason == "upstream_stream_broken"
