"""The npm `openai` package (tests/npm, installed by `make setup`) streams Chat
Completions and Responses through the real gateway: text with usage, tool-call
deltas, and refusals mapped to the SDK's error classes."""

from __future__ import annotations

import json

from tests.e2e.conftest import run_node
from tools.stack import Stack


def test_the_npm_openai_package_streams_through_the_gateway(stack: Stack) -> None:
    seen = run_node("sse_openai.mjs", {"SB_HTTP": stack.gateway_url, "SB_KEY": stack.dev_key})

    chat = seen["chatText"]
    assert chat["text"].startswith('turn 1: you said "Hello from npm".')
    assert chat["finish"] == "stop"
    assert chat["chunks"] > 3  # streamed, not one piece
    assert chat["usage"]["completion_tokens"] == len(chat["text"].split())

    tool = seen["chatTool"]
    assert tool["finish"] == "tool_calls"
    (call,) = tool["calls"]
    assert call["name"] == "get_weather"
    assert call["id"]
    assert json.loads(call["arguments"]) == {"city": "Paris"}

    responses = seen["responsesText"]
    assert responses["status"] == "completed"
    assert responses["text"].startswith('turn 1: you said "Hello from the Responses API".')
    assert responses["types"][0] == "response.created"
    assert "response.output_text.delta" in responses["types"]
    assert responses["types"][-1] == "response.completed"
    assert responses["usage"]["output_tokens"] == len(responses["text"].split())

    assert seen["badKey"] == {
        "error": "AuthenticationError",
        "status": 401,
        "code": "invalid_api_key",
    }
    assert seen["noMessages"]["error"] == "BadRequestError"
    assert seen["noMessages"]["status"] == 400
