"""The bounds on client input (docs/input-limits.md): the table agrees with the
code, and each limit, exceeded by one, gets its specific error from the protocol
core; values at the limit pass and their echo can be written back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from switchboard import errors
from switchboard.config import GatewaySettings
from switchboard.gateway import bounds
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.v1 import session_pb2

B = bounds
DOC = Path(__file__).parent.parent.parent / "docs" / "input-limits.md"


def kib(n: int) -> str:
    return f"{n // 1024} KiB"


# The limit cell of each row of the table, from the code.
EXPECTED_LIMITS = {
    "request line": kib(B.MAX_REQUEST_LINE_BYTES),
    "one header line": kib(B.MAX_HEADER_LINE_BYTES),
    "all headers": kib(B.MAX_HEAD_BYTES),
    "number of headers": str(B.MAX_HEADERS),
    "handshake time": f"{GatewaySettings.from_environ({}).handshake_timeout_s:g} s",
    "WebSocket frame": f"{GatewaySettings.from_environ({}).max_frame_bytes // 2**20} MiB",
    "client event": kib(GatewaySettings.from_environ({}).max_event_bytes),
    "text frame encoding": "valid UTF-8",
    "HTTP request body": kib(B.MAX_BODY_BYTES),
    "Chat Completions and Responses request body": kib(B.MAX_GENERATE_BODY_BYTES),
    "Chat Completions `messages`": str(B.MAX_INPUT_MESSAGES),
    "request body time": f"{B.BODY_TIMEOUT_S:g} s",
    "JSON nesting": f"{B.MAX_JSON_DEPTH} levels",
    "ids a client names": f"{B.MAX_ID_CHARS} characters",
    "model name": f"{B.MAX_MODEL_CHARS} characters",
    "`instructions`": f"{B.MAX_INSTRUCTIONS_CHARS} characters",
    "function tools": str(B.MAX_TOOLS),
    "function name": "1\u201364 characters from `[A-Za-z0-9_-]`",
    "function description": f"{B.MAX_TOOL_DESCRIPTION_CHARS} characters",
    "function parameters": kib(B.MAX_TOOL_SCHEMA_BYTES),
    "`response.metadata`: number": str(B.MAX_METADATA_KEYS),
    "`response.metadata`: one key": f"{B.MAX_METADATA_KEY_CHARS} characters",
    "`response.metadata`: one value": f"a string of {B.MAX_METADATA_VALUE_CHARS} characters",
    "error messages": f"{errors.MAX_MESSAGE_CHARS} and {errors.MAX_PARAM_CHARS} characters",
}


def documented_limits() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows[cells[0]] = re.sub(r" \(`SWITCHBOARD_[A-Z_]+`\)", "", cells[1])
    return rows


def test_the_limits_table_and_the_code_agree() -> None:
    rows = documented_limits()
    matched = {}
    for start, limit in EXPECTED_LIMITS.items():
        found = [what for what in rows if what.startswith(start)]
        assert len(found) == 1, f"no single row for {start!r}: {found}"
        matched[found[0]] = limit
    assert set(matched) == set(rows), f"rows the test does not know: {set(rows) - set(matched)}"
    for what, limit in matched.items():
        assert rows[what] == limit, what
    assert TOOL_NAME_PATTERN in B.TOOL_NAME.pattern


TOOL_NAME_PATTERN = "[A-Za-z0-9_-]{1,64}"


def make_protocol() -> RealtimeProtocol:
    config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
    protocol = RealtimeProtocol(session_id="sess_b", config=config, max_event_bytes=256 * 1024)
    protocol.open()
    protocol.take_events()
    return protocol


def answer(event: Any) -> tuple[str | None, str | None]:
    """(code, param) of the error a frame gets, (None, None) when it is accepted."""
    protocol = make_protocol()
    # The standard library writes deeper JSON than orjson (the hostile input).
    text = event if isinstance(event, str) else json.dumps(event)
    commands = protocol.receive_text(text)
    events = protocol.take_events()
    for out in events:
        orjson.dumps(out)  # every event the protocol queues can be sent
    errors_ = [e["error"] for e in events if e["type"] == "error"]
    if not errors_:
        assert commands or events
        return None, None
    assert not commands
    return errors_[0]["code"], errors_[0]["param"]


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def update(**session: Any) -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "realtime", **session}}


def create(**response: Any) -> dict[str, Any]:
    return {"type": "response.create", "response": response}


def tool(name: str = "f", **extra: Any) -> dict[str, Any]:
    return {"type": "function", "name": name, **extra}


def item(**fields: Any) -> dict[str, Any]:
    body = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    return {"type": "conversation.item.create", "item": {**body, **fields}}


# The reproducer and its siblings: 300 levels in each echoed field.
@pytest.mark.parametrize("field", ["tracing", "audio", "include", "prompt", "truncation"])
def test_deep_json_in_an_echoed_field_is_json_too_deep(field: str) -> None:
    assert answer(update(**{field: nested(300)})) == ("json_too_deep", None)


@pytest.mark.parametrize(
    "event",
    [
        create(metadata=nested(300)),
        update(tools=[tool(parameters=nested(300))]),
        create(tools=[tool(parameters=nested(300))]),
        "[" * 1000 + "]" * 1000,
        "[" * 5000 + "]" * 5000,  # deeper than the JSON reader takes
    ],
    ids=["metadata", "session-tools", "response-tools", "1000-arrays", "5000-arrays"],
)
def test_deep_json_anywhere_is_json_too_deep(event: Any) -> None:
    assert answer(event) == ("json_too_deep", None)


def test_json_at_the_depth_limit_passes_and_is_echoed() -> None:
    # The event, the session and the field take three levels.
    assert answer(update(tracing=nested(B.MAX_JSON_DEPTH - 2))) == (None, None)
    assert answer(update(tracing=nested(B.MAX_JSON_DEPTH - 1))) == ("json_too_deep", None)


LONG_ID = "r" * (B.MAX_ID_CHARS + 1)


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        (
            {"type": "conversation.item.retrieve", "item_id": "r" * 30_000},
            "value_too_large",
            "item_id",
        ),
        ({"type": "conversation.item.delete", "item_id": LONG_ID}, "value_too_large", "item_id"),
        ({"type": "response.cancel", "response_id": LONG_ID}, "value_too_large", "response_id"),
        ({"type": "response.create", "event_id": LONG_ID}, "value_too_large", "event_id"),
        (item(id=LONG_ID), "value_too_large", "item.id"),
        ({**item(), "previous_item_id": LONG_ID}, "value_too_large", "previous_item_id"),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": LONG_ID, "output": "{}"},
            },
            "value_too_large",
            "item.call_id",
        ),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call", "call_id": "c", "name": "a b"},
            },
            "invalid_value",
            "item.name",
        ),
        (update(model="m" * (B.MAX_MODEL_CHARS + 1)), "value_too_large", "session.model"),
        (update(model="gpt realtime"), "invalid_value", "session.model"),
        (update(model="a\x00b"), "invalid_value", "session.model"),
        (update(model=""), "invalid_value", "session.model"),
        (
            update(instructions="i" * (B.MAX_INSTRUCTIONS_CHARS + 1)),
            "value_too_large",
            "session.instructions",
        ),
        (
            create(instructions="i" * (B.MAX_INSTRUCTIONS_CHARS + 1)),
            "value_too_large",
            "response.instructions",
        ),
        (
            update(tools=[tool(f"t{i}") for i in range(B.MAX_TOOLS + 1)]),
            "value_too_large",
            "session.tools",
        ),
        (update(tools=[tool("")]), "invalid_value", "session.tools[0].name"),
        (update(tools=[tool("   ")]), "invalid_value", "session.tools[0].name"),
        (update(tools=[tool("n" * 10_000)]), "invalid_value", "session.tools[0].name"),
        (update(tools=[tool("a\x00b")]), "invalid_value", "session.tools[0].name"),
        (update(tools=[tool("{a}")]), "invalid_value", "session.tools[0].name"),
        (create(tools=[tool("x.y")]), "invalid_value", "response.tools[0].name"),
        (
            update(tools=[tool(description="d" * (B.MAX_TOOL_DESCRIPTION_CHARS + 1))]),
            "value_too_large",
            "session.tools[0].description",
        ),
        (
            update(tools=[tool(parameters={"p": "x" * B.MAX_TOOL_SCHEMA_BYTES})]),
            "value_too_large",
            "session.tools[0].parameters",
        ),
        (
            update(tool_choice={"type": "function", "name": "bad name"}),
            "invalid_value",
            "session.tool_choice.name",
        ),
        (
            create(metadata={f"k{i}": "v" for i in range(10_000)}),
            "value_too_large",
            "response.metadata",
        ),
        (create(metadata={"k": "v" * 200_000}), "value_too_large", "response.metadata.k"),
        (create(metadata={"k" * 65: "v"}), "value_too_large", "response.metadata key"),
        (create(metadata=["not", "an", "object"]), "invalid_value", "response.metadata"),
        (create(metadata={"k": 1}), "invalid_value", "response.metadata.k"),
        (update(type={"x": "y" * 100_000}), "invalid_value", "session.type"),
    ],
    ids=lambda value: None if isinstance(value, dict) else str(value)[:24],
)
def test_each_bound_has_its_error(event: dict[str, Any], code: str, param: str) -> None:
    assert answer(event) == (code, param)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.cancel", "response_id": "r" * B.MAX_ID_CHARS},
        item(id="i" * B.MAX_ID_CHARS),
        update(tools=[tool(f"t{i}") for i in range(B.MAX_TOOLS)]),
        update(tools=[tool("n" * 64, description="d" * B.MAX_TOOL_DESCRIPTION_CHARS)]),
        update(instructions="i" * B.MAX_INSTRUCTIONS_CHARS),
        create(metadata={f"k{i:02}" + "k" * 61: "v" * 512 for i in range(16)}),
        create(metadata=None),
    ],
    ids=["id", "item-id", "128-tools", "long-name", "instructions", "metadata", "no-metadata"],
)
def test_values_at_their_limit_pass(event: dict[str, Any]) -> None:
    code, _ = answer(event)
    # A cancel with nothing running is refused for that reason, not for its id.
    assert code in (None, "response_cancel_not_active")


def test_an_error_never_quotes_unbounded_input() -> None:
    protocol = make_protocol()
    huge = "x" * 100_000
    for event in (
        update(type=huge),
        item(role=huge),
        item(content=[{"type": huge, "text": "t"}]),
        {"type": huge},
        {"type": "conversation.item.create", "item": {"type": huge}},
        update(tools=[{"type": huge, "name": "f"}]),
    ):
        protocol.receive_text(orjson.dumps(event).decode())
    events = protocol.take_events()
    assert len(events) == 6
    for event in events:
        assert len(orjson.dumps(event)) < 2048, event["error"]


def test_an_error_is_cut_to_fit_grpc_metadata() -> None:
    error = errors.ItemNotFound("Item " + "r" * 30_000, param="p" * 10_000)
    assert len(error.message) == errors.MAX_MESSAGE_CHARS
    assert error.param is not None and len(error.param) == errors.MAX_PARAM_CHARS
    assert sum(len(k) + len(v) for k, v in error.grpc_trailers()) < 1024
    assert errors.quote("q" * 1000) == "'" + "q" * 63 + "\u2026'"
