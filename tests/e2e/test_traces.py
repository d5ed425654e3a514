"""One turn's trace, as a real OTLP receiver gets it from the four real services.

The session stack exports to the run's receiver (`otlp_receiver` in conftest.py).
A turn with a server-side tool call must arrive as one trace: rooted at the
gateway's `realtime.turn`, every backend SERVER span the child of the gateway's
CLIENT span for that call, the broker's model spans with the GenAI attributes
and the token counts the client saw, the tool's `execute_tool` span, and the
trace carried on into the upstream's HTTP requests and onto the log lines.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from switchboard.telemetry import tracing
from tests.e2e.conftest import RealtimeClient, connect
from tests.e2e.test_tools import calls, of_type, until_done
from tools.otlp_receiver import OtlpReceiver, ReceivedSpan
from tools.stack import DEV_TENANT, Stack

GENERATE = "switchboard.v1.BrokerService/Generate"
GATEWAY, SESSION, BROKER, TOOLEXEC = (
    f"switchboard-{name}" for name in ("gateway", "session", "broker", "toolexec")
)


def turn_root(spans: list[ReceivedSpan], response_id: str) -> ReceivedSpan | None:
    roots = [
        s
        for s in spans
        if s.name == "realtime.turn" and s.attributes.get(tracing.RESPONSE_ID) == response_id
    ]
    return roots[0] if roots else None


def complete(spans: list[ReceivedSpan], response_id: str) -> bool:
    """Whether the turn's trace is all in: its root, two model spans, the tool's span, and a
    SERVER span for each of the gateway's CLIENT spans (each service exports on its own)."""
    root = turn_root(spans, response_id)
    if root is None:
        return False
    members = [s for s in spans if s.trace_id == root.trace_id]
    clients = [s for s in members if s.service == GATEWAY and s.kind == "CLIENT"]
    servers = [s for s in members if s.kind == "SERVER" and s.service != GATEWAY]
    chats = [s for s in members if s.name.startswith("chat ")]
    tools = [s for s in members if s.name.startswith("execute_tool")]
    return len(chats) == 2 and len(tools) == 1 and len(servers) == len(clients) > 0


async def test_a_turn_with_a_tool_is_one_trace_across_the_four_services(
    stack: Stack, otlp_receiver: OtlpReceiver
) -> None:
    async with connect(stack) as connection:
        client = RealtimeClient(connection)
        session_id = (await client.recv())["session"]["id"]
        await client.say("what is 6*7? " + calls(("calculate", {"expression": "6*7"})))
        await client.send({"type": "response.create"})
        events = await until_done(client, 2)
    first, second = (done["response"] for done in of_type(events, "response.done"))
    assert (first["status"], second["status"]) == ("completed", "completed")
    (call,) = first["output"]
    spans = otlp_receiver.wait_for(lambda received: complete(received, first["id"]), 20)

    root = turn_root(spans, first["id"])
    assert root is not None
    trace = [s for s in spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: s for s in trace}

    # One trace, rooted at the gateway's turn, crossing all four services.
    assert (root.service, root.kind, root.parent_span_id) == (GATEWAY, "SERVER", "")
    assert {s.service for s in trace} == {GATEWAY, SESSION, BROKER, TOOLEXEC}
    assert root.attributes[tracing.SESSION_ID] == session_id
    assert root.attributes[tracing.CONNECTION_ID].startswith("conn_")
    assert all(s.attributes[tracing.TENANT_ID] == DEV_TENANT for s in trace), [
        s.name for s in trace if s.attributes.get(tracing.TENANT_ID) != DEV_TENANT
    ]
    assert all(s.parent_span_id in by_id for s in trace if s is not root)

    # Each backend's SERVER span is the child of the gateway's CLIENT span for that call.
    servers = [s for s in trace if s.kind == "SERVER" and s is not root]
    assert {s.attributes["rpc.method"] for s in servers} >= {
        "switchboard.v1.SessionService/BuildContext",
        "switchboard.v1.SessionService/AppendItem",
        GENERATE,
        "switchboard.v1.ToolExecService/Execute",
    }
    for server in servers:
        caller = by_id[server.parent_span_id]
        assert (caller.service, caller.kind) == (GATEWAY, "CLIENT")
        assert caller.name == server.name == server.attributes["rpc.method"]
    clients = [s for s in trace if s.kind == "CLIENT" and s.service == GATEWAY]
    assert sorted(s.span_id for s in clients) == sorted(s.parent_span_id for s in servers)

    # Two responses under the turn, each with what response.done told the client.
    responses = {
        s.attributes[tracing.RESPONSE_ID]: s for s in trace if s.name == "realtime.response"
    }
    assert set(responses) == {first["id"], second["id"]}
    for done in (first, second):
        span = responses[done["id"]]
        assert span.parent_span_id == root.span_id
        assert span.attributes["switchboard.response.status"] == "completed"
        assert span.attributes["switchboard.usage.input_tokens"] == done["usage"]["input_tokens"]
        assert span.attributes["switchboard.usage.output_tokens"] == done["usage"]["output_tokens"]

    # The broker's model spans: GenAI attributes, the client's token counts.
    chats = {}
    for chat in (s for s in trace if s.name.startswith("chat ")):
        generate = by_id[chat.parent_span_id]
        assert (generate.service, generate.name) == (
            BROKER,
            "switchboard.v1.BrokerService/Generate",
        )
        response = by_id[by_id[generate.parent_span_id].parent_span_id]
        chats[response.attributes[tracing.RESPONSE_ID]] = chat
    assert set(chats) == {first["id"], second["id"]}
    for done, reason in ((first, "tool_calls"), (second, "stop")):
        chat = chats[done["id"]]
        assert (chat.service, chat.kind, chat.name) == (BROKER, "CLIENT", "chat gpt-realtime")
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == "gpt-realtime"
        assert chat.attributes["gen_ai.response.model"] == "gpt-realtime"
        assert chat.attributes["gen_ai.usage.input_tokens"] == done["usage"]["input_tokens"]
        assert chat.attributes["gen_ai.usage.output_tokens"] == done["usage"]["output_tokens"]
        assert chat.attributes["gen_ai.response.finish_reasons"] == [reason]
        assert chat.attributes["gen_ai.conversation.id"] == session_id
        assert chat.attributes[tracing.RESPONSE_ID] == done["id"]
        assert chat.attributes["server.port"] == stack.ports.simulator

    # The tool's span under toolexec's SERVER span, under the turn.
    (tool,) = [s for s in trace if s.name.startswith("execute_tool")]
    execute = by_id[tool.parent_span_id]
    assert (tool.service, tool.name, execute.name) == (
        TOOLEXEC,
        "execute_tool calculate",
        "switchboard.v1.ToolExecService/Execute",
    )
    assert by_id[execute.parent_span_id].parent_span_id == root.span_id
    assert tool.attributes["gen_ai.tool.name"] == "calculate"
    assert tool.attributes["gen_ai.tool.call.id"] == call["call_id"]
    assert tool.attributes["switchboard.tool.outcome"] == "ok"

    # The trace went on into both upstream HTTP requests, each the child of its model span.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.simulator_url}/_sim/streams") as reply,
    ):
        records: list[dict[str, Any]] = (await reply.json())["streams"]
    parents = {
        record["traceparent"].split("-")[2]
        for record in records
        if record["traceparent"].split("-")[1:2] == [root.trace_id]
    }
    assert parents == {chat.span_id for chat in chats.values()}

    # The broker's log line of each call names the trace and its SERVER span.
    log = stack.services["broker"].log_path.read_bytes().splitlines()
    lines = [orjson.loads(line) for line in log if line.startswith(b"{")]
    logged = [
        line
        for line in lines
        if line.get("msg") == "generate completed" and line.get("response_id") == first["id"]
    ]
    assert [(line["trace_id"], line["span_id"]) for line in logged] == [
        (root.trace_id, chats[first["id"]].parent_span_id)
    ]
