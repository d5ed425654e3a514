"""VoiceTools' decisions, fed events as a voice session sees them: which tools go
upstream, what the client sees of them, which calls are the gateway's, the round
limit. (Running tools needs toolexec: tests/e2e/test_voice_tools.py.)"""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.gateway.server_tools import ServerTools
from switchboard.gateway.voice_mcp import VoiceMcp
from switchboard.gateway.voice_mcp_offer import McpOffer
from switchboard.gateway.voice_tools import VoiceTools
from switchboard.v1 import common_pb2


def tools(max_rounds: int = 8) -> tuple[VoiceTools, list[str], list[bytes]]:
    to_client: list[str] = []
    to_upstream: list[bytes] = []
    voice = VoiceTools(
        ServerTools(None, "acme", "sess_1"),  # type: ignore[arg-type]  # never called here
        max_rounds,
        to_upstream=to_upstream.append,
        to_client=to_client.append,
        on_idle=lambda: None,
        mcp=VoiceMcp(
            McpOffer(
                None,  # type: ignore[arg-type]  # never called here
                "acme",
                "sess_1",
                {},
                new_id=lambda: "item_1",
                to_client=to_client.append,
            )
        ),
        hold=lambda: None,
        release=lambda: None,
    )
    voice.catalogue = {
        "calculate": common_pb2.ToolDefinition(
            name="calculate", description="Arithmetic.", parameters_json='{"type":"object"}'
        )
    }
    return voice, to_client, to_upstream


def client_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "name": name, "description": "", "parameters": {}}


def done(*names: str, status: str = "completed") -> dict[str, Any]:
    output = [{"type": "function_call", "name": n, "call_id": f"call_{n}"} for n in names]
    return {
        "type": "response.done",
        "response": {"id": "resp_1", "status": status, "output": output},
    }


def test_server_tools_go_upstream_after_the_clients_and_are_hidden_from_it() -> None:
    voice, _, _ = tools()
    event = {"type": "session.update", "session": {"tools": [client_tool("get_weather")]}}
    sent = orjson.loads(voice.client(event, "session.update", orjson.dumps(event).decode()) or "")
    assert [t["name"] for t in sent["session"]["tools"]] == ["get_weather", "calculate"]
    assert sent["session"]["tools"][1]["parameters"] == {"type": "object"}
    echo = {"type": "session.updated", "session": sent["session"]}
    shown = orjson.loads(voice.session(echo) or b"")
    assert [t["name"] for t in shown["session"]["tools"]] == ["get_weather"]
    # An echo without server tools is sent as it came.
    assert voice.session({"type": "session.updated", "session": {"tools": []}}) is None


def test_a_client_tool_of_the_same_name_wins() -> None:
    voice, _, _ = tools()
    session = voice.opening({"tools": [client_tool("calculate")]})
    assert [t["name"] for t in session["tools"]] == ["calculate"]
    assert voice.server_calls(done("calculate")) == ([], True)


def test_which_calls_are_the_gateways() -> None:
    voice, _, _ = tools()
    voice.opening({"tools": [client_tool("get_weather")]})
    ours, client_runs = voice.server_calls(done("calculate", "get_weather"))
    assert [c["name"] for c in ours] == ["calculate"] and client_runs
    # A name nobody declared is the client's to answer (the upstream made it up).
    assert voice.server_calls(done("teleport")) == ([], True)
    assert voice.server_calls(done("calculate", status="cancelled")) == ([], False)
    assert voice.wants(done("calculate")) and not voice.wants(done("get_weather"))


def test_the_round_limit_stops_the_loop_with_an_error() -> None:
    voice, to_client, to_upstream = tools(max_rounds=0)
    assert not voice.wants(done("calculate"))
    event = done("calculate")
    voice.response_done(event, orjson.dumps(event).decode(), run=True)
    response_done, error = [orjson.loads(text) for text in to_client]
    assert response_done == event
    assert error["error"]["code"] == "tool_rounds_exceeded"
    assert not to_upstream and not voice.busy
