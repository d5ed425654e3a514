"""Client events of the Realtime protocol, decoded and validated as pure functions.

The protocol (protocol.py) keeps the state; these functions only read a frame
or an event and raise `InvalidRequest` naming the offending field, the way
OpenAI names it (`response.tools[0].name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter
from switchboard.gateway import bounds, fields, items, mcp_config
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]
_C = common_pb2

# Realtime events this gateway does not implement (audio, truncation): a client
# sending them gets `unsupported_feature`, not `unknown_event_type`.
UNSUPPORTED_EVENTS = frozenset(
    {
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "output_audio_buffer.clear",
        "conversation.item.truncate",
        "transcription_session.update",
    }
)
RESPONSE_FIELDS = frozenset(
    {
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "output_modalities",
        "metadata",
        "conversation",
        "audio",
        "prompt",
        "input",
    }
)


def decode(text: str, max_event_bytes: int) -> Event:
    """One client text frame as a JSON object.

    Raises:
        InvalidRequest: `frame_too_large`, `invalid_json`, `json_too_deep`,
            `invalid_value` for JSON that is not an object, `value_too_large`
            for an `event_id` over its limit.
    """
    # A str is at most 4 bytes a character, so most frames need no encoding.
    if len(text) * 4 > max_event_bytes and len(text.encode()) > max_event_bytes:
        raise InvalidRequest(
            f"The event is larger than {max_event_bytes} bytes and was ignored.",
            code=_C.ERROR_CODE_FRAME_TOO_LARGE,
        )
    event = bounds.loads_object(text, "event")
    event_id = event.get("event_id")
    if isinstance(event_id, str):
        bounds.check_id(event_id, "event_id")
    return event


def event_type(event: Event) -> str:
    """The event's `type`, which must be a string."""
    kind = event.get("type")
    if kind is None:
        raise missing_parameter("type")
    if not isinstance(kind, str):
        raise invalid_value("type", "Invalid type for 'type': expected a string.")
    return kind


def unknown_event(kind: str) -> InvalidRequest:
    """The error for an event type this gateway does not serve."""
    if kind in UNSUPPORTED_EVENTS:
        return InvalidRequest(
            f"'{kind}' is not supported: Switchboard serves text conversations.",
            code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
            param="type",
        )
    return InvalidRequest(
        f"Unknown event type '{kind[:64]}'.", code=_C.ERROR_CODE_UNKNOWN_EVENT_TYPE, param="type"
    )


def item_create(event: Event) -> tuple[common_pb2.Item, str]:
    """`conversation.item.create`: the item (its id may be empty) and the
    `previous_item_id` ("" when not given)."""
    item = items.item_from_client(event.get("item"))
    return item, fields.optional_id(event, "previous_item_id")


@dataclass(frozen=True, slots=True)
class ResponseSettings:
    """What a `response.create` asks for, with the session's settings filled in."""

    instructions: str | None
    tools: tuple[common_pb2.ToolDefinition, ...]
    tool_choice: str
    max_output_tokens: int
    metadata: Any
    mcp_tools: tuple[common_pb2.McpToolConfig, ...] = ()


def response_object(event: Event) -> Event:
    """`response.create`'s `response` object ({} when absent), with known fields only."""
    raw = event.get("response") or {}
    if not isinstance(raw, dict):
        raise invalid_value("response", "Invalid type for 'response': expected an object.")
    fields.reject_unknown(raw, RESPONSE_FIELDS, "response")
    return raw


def response_settings(
    raw: Event, config: session_pb2.SessionConfig, mcp_servers: mcp_config.Servers | None = None
) -> ResponseSettings:
    """A `response` object (`response_object`) over the session's `config`; an
    MCP server in `response.tools` must be one of `mcp_servers`."""
    if raw.get("conversation", "auto") != "auto" or raw.get("input") is not None:
        raise InvalidRequest(
            "Out-of-band responses ('conversation': 'none' or 'input') are not supported yet.",
            code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
            param="response.conversation",
        )
    instructions = fields.instructions(raw, "response") if "instructions" in raw else None
    max_tokens = (
        fields.max_output_tokens(raw["max_output_tokens"], "response")
        if "max_output_tokens" in raw
        else config.max_output_tokens
    )
    if "tools" in raw:
        functions, mcp = mcp_config.split_tools(raw["tools"], "response.tools", mcp_servers or {})
        tools, mcp_tools = tuple(functions), tuple(mcp)
    else:
        tools, mcp_tools = tuple(config.tools), tuple(config.mcp_tools)
    tool_choice = (
        fields.tool_choice(raw["tool_choice"], "response.tool_choice")
        if "tool_choice" in raw
        else config.tool_choice
    )
    if "output_modalities" in raw:
        fields.output_modalities(raw["output_modalities"], "response")
    metadata = bounds.metadata(raw.get("metadata"), "response.metadata")
    return ResponseSettings(instructions, tools, tool_choice, max_tokens, metadata, mcp_tools)
