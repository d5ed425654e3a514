"""Voice sessions' client checks and outbox, as pure functions (no sockets)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from switchboard.errors import InvalidRequest
from switchboard.gateway.voice_events import (
    AUDIO_BURST_S,
    MAX_AUDIO_RATE,
    MAX_BUFFER_S,
    AudioInput,
    check_event,
    check_session,
    response_usage,
)
from switchboard.gateway.voice_outbox import SlowConsumer, VoiceOutbox

SESSION = {"model": "voice", "instructions": "Be kind."}


def pcm(seconds: float) -> str:
    return base64.b64encode(bytes(int(48_000 * seconds) // 2 * 2)).decode()


def code(error: pytest.ExceptionInfo[InvalidRequest]) -> tuple[str, str | None]:
    return error.value.name, error.value.param


def test_audio_chunks_are_counted_and_bounded_by_rate_and_buffer() -> None:
    audio = AudioInput()
    assert audio.append(pcm(1.0), now=0.0) == pytest.approx(1.0)
    with pytest.raises(InvalidRequest) as odd:
        audio.append(base64.b64encode(b"\x00" * 3).decode(), now=0.0)
    assert code(odd) == ("invalid_audio", "audio")
    with pytest.raises(InvalidRequest) as garbage:
        audio.append("**", now=0.0)
    assert code(garbage) == ("invalid_audio", "audio")
    # The burst is spent...
    audio.append(pcm(AUDIO_BURST_S - 1.0), now=0.0)
    with pytest.raises(InvalidRequest) as fast:
        audio.append(pcm(0.5), now=0.0)
    assert code(fast) == ("audio_rate_exceeded", "audio")
    # ... and comes back at MAX_AUDIO_RATE seconds of audio per second.
    assert audio.append(pcm(0.5), now=0.5 / MAX_AUDIO_RATE)
    assert audio.buffered_s == pytest.approx(AUDIO_BURST_S + 0.5)
    audio.emptied()
    assert audio.buffered_s == 0


def test_the_buffer_holds_max_buffer_s_of_uncommitted_audio() -> None:
    audio = AudioInput(format="audio/pcmu")
    now = 0.0
    while audio.buffered_s + 2.0 <= MAX_BUFFER_S:
        now += 10.0
        audio.append(base64.b64encode(bytes(16_000)).decode(), now=now)
    with pytest.raises(InvalidRequest) as full:
        audio.append(base64.b64encode(bytes(16_000)).decode(), now=now + 10.0)
    assert code(full) == ("input_audio_buffer_full", "audio")
    # G.711 has no sample alignment to keep.
    assert audio.format == "audio/pcmu"


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"audio": {"input": {"format": {"type": "audio/wav"}}}}, "session.audio.input.format"),
        (
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            "session.audio.input.format.rate",
        ),
        ({"audio": {"output": {"voice": "robot"}}}, "session.audio.output.voice"),
        ({"audio": {"output": {"speed": 3}}}, "session.audio.output.speed"),
        (
            {"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}},
            "session.audio.input.turn_detection.type",
        ),
        (
            {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}},
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "max"}}}},
            "session.audio.input.turn_detection.eagerness",
        ),
        (
            {"audio": {"input": {"noise_reduction": {"type": "studio"}}}},
            "session.audio.input.noise_reduction",
        ),
        (
            {"audio": {"input": {"transcription": {"model": 5}}}},
            "session.audio.input.transcription.model",
        ),
        ({"audio": {"input": {"echo": True}}}, "session.audio.input.echo"),
        ({"model": "other"}, "session.model"),
        ({"output_modalities": ["audio", "text"]}, "session.output_modalities"),
        ({"tools": [{"type": "file_search"}]}, "session.tools[0].type"),
        # An MCP server the tenant did not register (voice_mcp.py for the rest).
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "session.tools[0].server_label"),
    ],
)
def test_bad_session_updates_name_the_field(session: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_session({"type": "realtime", **session}, SESSION, frozenset())
    assert refused.value.param == param


def test_a_good_session_update_returns_its_input_format() -> None:
    update = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcma"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.6,
                    "silence_duration_ms": 300,
                },
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "noise_reduction": {"type": "far_field"},
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": {"id": "voice_1"}},
        },
    }
    assert check_session(update, SESSION, frozenset()) == "audio/pcma"
    assert check_session({"type": "realtime", "instructions": "x"}, SESSION, frozenset()) is None


def test_locked_fields_stay_locked() -> None:
    with pytest.raises(InvalidRequest) as locked:
        check_session({"instructions": "other"}, SESSION, frozenset({"instructions"}))
    assert code(locked) == ("field_locked", "session.instructions")
    check_session({"instructions": "Be kind."}, SESSION, frozenset({"instructions"}))


def test_other_events() -> None:
    with pytest.raises(InvalidRequest) as unknown:
        check_event({}, "transcription_session.update")
    assert code(unknown) == ("unknown_event_type", "type")
    truncate = {"item_id": "item_1", "content_index": 0, "audio_end_ms": -1}
    with pytest.raises(InvalidRequest) as negative:
        check_event(truncate, "conversation.item.truncate")
    assert code(negative) == ("invalid_value", "audio_end_ms")
    check_event(
        {"item_id": "item_1", "content_index": 0, "audio_end_ms": 5}, "conversation.item.truncate"
    )
    with pytest.raises(InvalidRequest) as item:
        check_event({"item": {"type": "image"}}, "conversation.item.create")
    assert item.value.param == "item.type"


async def test_the_outbox_never_merges_and_cuts_at_its_bound() -> None:
    outbox = VoiceOutbox(max_bytes=100)
    outbox.put("a" * 40, first_audio_of="resp_1")
    outbox.put("b" * 40)
    with pytest.raises(SlowConsumer):
        outbox.put("c" * 40)
    first = await outbox.get()
    assert (first.text, first.first_audio_of) == ("a" * 40, "resp_1")
    assert (await outbox.get()).text == "b" * 40
    assert outbox.size == 0


def test_a_realtime_usage_is_counted_with_its_audio_share() -> None:
    usage, audio = response_usage(
        {
            "total_tokens": 821,
            "input_tokens": 789,
            "output_tokens": 32,
            "input_token_details": {
                "text_tokens": 313,
                "audio_tokens": 476,
                "cached_tokens": 640,
                "cached_tokens_details": {"text_tokens": 256, "audio_tokens": 384},
            },
            "output_token_details": {"text_tokens": 9, "audio_tokens": 23},
        }
    )
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (789, 640, 32)
    assert usage.total_tokens == 821
    assert (audio.input, audio.cached_input, audio.output) == (476, 384, 23)
    # Missing or bad counts are 0; the total is the sum when not given.
    usage, audio = response_usage({"input_tokens": 5, "output_tokens": True})
    assert (usage.total_tokens, usage.output_tokens, audio.input) == (5, 0, 0)
    assert response_usage(None)[0].total_tokens == 0
