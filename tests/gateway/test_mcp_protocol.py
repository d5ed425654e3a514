"""MCP tools in the protocol core: client tool configs and MCP output items; no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from switchboard.errors import InvalidRequest
from switchboard.gateway import mcp_config
from switchboard.gateway.commands import StartResponse, UpdateSession
from switchboard.gateway.mcp_output import McpName, tool_error
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.tenancy import McpServer
from switchboard.v1 import common_pb2, session_pb2

URL = "https://mcp.acme.example/mcp"
SERVERS = {"shop": McpServer("shop", URL)}


def make_protocol() -> RealtimeProtocol:
    config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
    protocol = RealtimeProtocol(
        session_id="sess_mcp", config=config, max_event_bytes=65536, mcp_servers=SERVERS
    )
    protocol.open()
    protocol.take_events()
    return protocol


def send(protocol: RealtimeProtocol, event: Any) -> list[Any]:
    return protocol.receive_text(json.dumps(event))


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def parse(tool: dict[str, Any]) -> common_pb2.McpToolConfig:
    functions, mcp = mcp_config.split_tools([tool], "session.tools", SERVERS)
    assert not functions
    return mcp[0]


def test_a_registered_server_by_label_or_by_its_exact_url() -> None:
    assert parse({"type": "mcp", "server_label": "shop"}).server_label == "shop"
    assert parse({"type": "mcp", "server_label": "shop", "server_url": URL}).server_label == "shop"
    # Another label with exactly the registered URL is that server.
    config = parse({"type": "mcp", "server_label": "other", "server_url": URL})
    assert config.server_label == "shop"


@pytest.mark.parametrize(
    ("tool", "code", "param"),
    [
        ({"type": "mcp", "server_label": "nope"}, "mcp_server_not_registered", "[0].server_label"),
        (
            {"type": "mcp", "server_label": "shop", "server_url": URL + "/"},
            "mcp_server_not_registered",
            "[0].server_url",
        ),
        (
            {"type": "mcp", "server_label": "x", "server_url": "http://169.254.169.254/"},
            "mcp_server_not_registered",
            "[0].server_url",
        ),
        (
            {"type": "mcp", "server_label": "shop", "authorization": "t"},
            "unsupported_feature",
            "[0].authorization",
        ),
        (
            {"type": "mcp", "server_label": "shop", "connector_id": "connector_gmail"},
            "unsupported_feature",
            "[0].connector_id",
        ),
        ({"type": "mcp", "server_label": "shop", "colour": 1}, "unknown_parameter", "[0].colour"),
        (
            {"type": "mcp", "server_label": "shop", "require_approval": "maybe"},
            "invalid_value",
            "[0].require_approval",
        ),
        (
            {"type": "mcp", "server_label": "shop", "allowed_tools": ["a b"]},
            "invalid_value",
            "[0].allowed_tools[0]",
        ),
    ],
)
def test_bad_mcp_tools_get_specific_errors(tool: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        mcp_config.split_tools([tool], "session.tools", SERVERS)
    assert (caught.value.name, caught.value.param) == (code, "session.tools" + param)
    assert "169.254" not in caught.value.message and URL not in caught.value.message


def test_a_server_listed_twice_is_refused() -> None:
    tool = {"type": "mcp", "server_label": "shop"}
    with pytest.raises(InvalidRequest) as caught:
        mcp_config.split_tools([tool, tool], "session.tools", SERVERS)
    assert caught.value.param == "session.tools[1].server_label"


def test_approval_and_allowed_tools() -> None:
    default = parse({"type": "mcp", "server_label": "shop"})
    assert mcp_config.client_wants_approval(default, "any")  # OpenAI's default: always
    never = parse({"type": "mcp", "server_label": "shop", "require_approval": "never"})
    assert not mcp_config.client_wants_approval(never, "any")
    only_delete = parse(
        {
            "type": "mcp",
            "server_label": "shop",
            "require_approval": {"always": {"tool_names": ["delete"]}},
        }
    )
    assert mcp_config.client_wants_approval(only_delete, "delete")
    assert not mcp_config.client_wants_approval(only_delete, "read")
    all_but_read = parse(
        {
            "type": "mcp",
            "server_label": "shop",
            "require_approval": {"never": {"tool_names": ["read"]}},
        }
    )
    assert not mcp_config.client_wants_approval(all_but_read, "read")
    assert mcp_config.client_wants_approval(all_but_read, "delete")
    allowed = parse(
        {"type": "mcp", "server_label": "shop", "allowed_tools": {"tool_names": ["read"]}}
    )
    assert mcp_config.client_allows(allowed, "read") and not mcp_config.client_allows(allowed, "x")
    assert mcp_config.client_allows(default, "x")


def test_session_update_keeps_function_tools_beside_mcp_tools() -> None:
    protocol = make_protocol()
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    mcp = {"type": "mcp", "server_label": "shop", "require_approval": "never"}
    (command,) = send(
        protocol,
        {"type": "session.update", "session": {"type": "realtime", "tools": [weather, mcp]}},
    )
    assert isinstance(command, UpdateSession)
    assert [tool.name for tool in command.config.tools] == ["get_weather"]
    assert [tool.server_label for tool in command.config.mcp_tools] == ["shop"]
    protocol.session_updated(command)
    (start,) = send(protocol, {"type": "response.create"})
    assert isinstance(start, StartResponse)
    assert [tool.server_label for tool in start.mcp_tools] == ["shop"]


def test_an_mcp_call_streams_runs_and_closes_with_its_output() -> None:
    protocol = make_protocol()
    (start,) = send(protocol, {"type": "response.create"})
    output = protocol.mcp_output(start.response_id)
    output.mcp_names = {"shop__lookup": McpName("shop", "lookup", needs_approval=False)}
    protocol.call_delta(start.response_id, 0, "call_1", "shop__lookup", '{"id"')
    protocol.call_delta(start.response_id, 0, "", "", ":1}")
    (entry,) = output.pending_mcp_calls()
    output.mcp_call_started(entry)
    output.mcp_call_finished(entry, output='{"ok":true}', error=None)
    (item,) = protocol.complete_output(start.response_id, complete=True)
    events = protocol.take_events()
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_item.done",
    ]
    assert events[1]["item"]["type"] == "mcp_call"
    done = events[-1]["item"]
    assert (done["name"], done["arguments"], done["output"]) == (
        "lookup",
        '{"id":1}',
        '{"ok":true}',
    )
    assert item.type == common_pb2.ITEM_TYPE_MCP_CALL and item.call_id == "call_1"
    assert not output.pending_mcp_calls()


def test_a_call_that_needs_approval_is_an_approval_request_and_never_runs() -> None:
    protocol = make_protocol()
    (start,) = send(protocol, {"type": "response.create"})
    output = protocol.mcp_output(start.response_id)
    output.mcp_names = {"shop__delete": McpName("shop", "delete", needs_approval=True)}
    protocol.call_delta(start.response_id, 0, "call_2", "shop__delete", '{"id":1}')
    assert output.pending_mcp_calls() == []
    (item,) = protocol.complete_output(start.response_id, complete=True)
    events = protocol.take_events()
    assert "response.mcp_call_arguments.delta" not in types(events)
    assert events[-1]["item"] == {
        "id": item.id,
        "object": "realtime.item",
        "type": "mcp_approval_request",
        "server_label": "shop",
        "name": "delete",
        "arguments": '{"id":1}',
    }
    assert item.type == common_pb2.ITEM_TYPE_MCP_APPROVAL_REQUEST


def test_approval_responses_are_validated_and_kept_for_the_next_response() -> None:
    protocol = make_protocol()
    send(
        protocol,
        {"type": "conversation.item.create", "item": {"type": "mcp_approval_response"}},
    )
    error = protocol.take_events()[0]["error"]
    assert (error["code"], error["param"]) == ("missing_required_parameter", "item.approve")
    (store,) = send(
        protocol,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "mcp_approval_response",
                "approval_request_id": "item_9",
                "approve": True,
            },
        },
    )
    protocol.item_added(store.item, "")
    assert [answer.approval_request_id for answer in protocol.approvals] == ["item_9"]
    assert protocol.take_events()[-1]["item"]["type"] == "mcp_approval_response"


def test_a_failed_call_keeps_its_error() -> None:
    protocol = make_protocol()
    (start,) = send(protocol, {"type": "response.create"})
    output = protocol.mcp_output(start.response_id)
    output.mcp_names = {"shop__x": McpName("shop", "x", needs_approval=False)}
    protocol.call_delta(start.response_id, 0, "call_3", "shop__x", "{}")
    (entry,) = output.pending_mcp_calls()
    output.mcp_call_started(entry)
    output.mcp_call_finished(entry, output=None, error=tool_error("boom"))
    (item,) = protocol.complete_output(start.response_id, complete=True)
    events = protocol.take_events()
    assert "response.mcp_call.failed" in types(events)
    assert events[-1]["item"]["error"] == {"type": "tool_execution_error", "message": "boom"}
    assert json.loads(item.error_json) == {"type": "tool_execution_error", "message": "boom"}
