"""The JS Agents SDK (`@openai/agents` 0.14.3 in tests/npm, installed by `make setup`):
a RealtimeSession over its WebSocket transport in Node speaks a turn to a voice
model through the real gateway, runs the function tool the model calls, and hears
the spoken reply (as tests/e2e/test_voice_agents_sdk.py does for Python)."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.e2e.conftest import run_node
from tests.voice_support import silence, speech
from tools.stack import Stack

CALL = {"name": "get_weather", "arguments": {"city": "Bergen"}}
SIM = orjson.dumps({"transcript": "weather in Bergen", "tool_calls": [CALL]}).decode()


def test_the_js_agents_sdk_runs_a_tool_by_voice_over_websocket(
    stack: Stack, tmp_path: Path
) -> None:
    audio = tmp_path / "speech.pcm"
    audio.write_bytes(silence(200) + speech("weather in Bergen") + silence(500))
    seen = run_node(
        "voice_agents.mjs",
        {
            "SB_WS": stack.websocket_url,
            "SB_KEY": stack.dev_key,
            "SB_MODEL": "gpt-realtime-voice",
            "SB_AUDIO": str(audio),
            "SB_SIM": f"[[sim {SIM}]]",
        },
    )
    assert seen["errors"] == []
    assert seen["calls"] == ["Bergen"]
    assert seen["toolOutput"] == "rain in Bergen"
    assert seen["transcript"] == "tool get_weather returned rain in Bergen"
    assert seen["audioBytes"] > 0
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "response.function_call_arguments.done",
        "response.output_audio.delta",
    ):
        assert kind in seen["types"], kind
