"""The OpenAI Agents SDK's RealtimeRunner runs a function tool through the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

from tools.stack import Stack

DIRECTIVE = '[[sim {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}]]'


async def test_realtime_runner_runs_a_function_tool(stack: Stack) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"snow in {city}"

    agent = RealtimeAgent(name="Forecaster", instructions="Answer briefly.", tools=[get_weather])
    runner = RealtimeRunner(
        starting_agent=agent,
        config={"model_settings": {"model_name": "gpt-realtime", "output_modalities": ["text"]}},
    )
    session = await runner.run(
        model_config={
            "url": f"{stack.websocket_url}?model=gpt-realtime",
            "api_key": stack.dev_key,
        }
    )
    seen: list[str] = []
    errors: list[Any] = []
    tool_output: Any = None
    answer = ""
    async with session:
        await session.send_message(f"What is the weather in Oslo? {DIRECTIVE}")

        async def read() -> None:
            nonlocal tool_output, answer
            async for event in session:
                seen.append(event.type)
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "tool_end":
                    tool_output = event.output
                elif event.type == "raw_model_event":
                    data = event.data
                    if getattr(data, "type", None) == "output_text_delta":
                        answer += data.delta
                    ended = getattr(data, "type", None) == "turn_ended"
                    if ended and tool_output is not None and answer:
                        return

        await asyncio.wait_for(read(), 30)
    assert not errors, errors
    assert calls == ["Oslo"]
    assert tool_output == "snow in Oslo"
    assert "tool_start" in seen
    assert answer.startswith("tool get_weather returned snow in Oslo")
