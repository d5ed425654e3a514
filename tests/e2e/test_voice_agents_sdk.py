"""The OpenAI Agents SDK's RealtimeRunner, in its default audio mode, completes a
spoken turn with a function tool through a voice session."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

from tests.voice_support import silence, speech
from tools.stack import Stack

CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}
SIM = orjson.dumps({"transcript": "weather in Oslo", "tool_calls": [CALL]}).decode()


async def test_realtime_runner_in_audio_mode_runs_a_tool_by_voice(stack: Stack) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"snow in {city}"

    agent = RealtimeAgent(
        name="Forecaster", instructions=f"Answer briefly. [[sim {SIM}]]", tools=[get_weather]
    )
    runner = RealtimeRunner(
        starting_agent=agent, config={"model_settings": {"model_name": "gpt-realtime-voice"}}
    )
    session = await runner.run(
        model_config={
            "url": f"{stack.websocket_url}?model=gpt-realtime-voice",
            "api_key": stack.dev_key,
        }
    )
    seen: list[str] = []
    errors: list[Any] = []
    audio = 0
    transcript = ""
    tool_output: Any = None
    async with session:
        pcm = speech("weather in Oslo") + silence(500)
        for start in range(0, len(pcm), 960):  # 20 ms
            await session.send_audio(pcm[start : start + 960])

        async def read() -> None:
            nonlocal audio, transcript, tool_output
            async for event in session:
                seen.append(event.type)
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "tool_end":
                    tool_output = event.output
                elif event.type == "audio":
                    audio += len(event.audio.data)
                elif event.type == "raw_model_event":
                    data = event.data
                    if getattr(data, "type", None) == "transcript_delta":
                        transcript += data.delta
                    ended = getattr(data, "type", None) == "turn_ended"
                    if ended and tool_output is not None and transcript:
                        return

        await asyncio.wait_for(read(), 30)
    assert not errors, errors
    assert calls == ["Oslo"]
    assert tool_output == "snow in Oslo"
    assert transcript.startswith("tool get_weather returned snow in Oslo")
    assert audio > 0
