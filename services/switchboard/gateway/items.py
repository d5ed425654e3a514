"""Conversation items: Realtime JSON <-> `switchboard.v1.Item`, with validation.

Client items are checked field by field; a bad field raises `InvalidRequest`
whose `param` names it the way OpenAI does (`item.content[0].text`).
"""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter, quote
from switchboard.gateway import bounds, fields
from switchboard.v1 import common_pb2

_ROLES = {
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "system": common_pb2.ROLE_SYSTEM,
}
_ROLE_NAMES = {v: k for k, v in _ROLES.items()}
_STATUS_NAMES = {
    common_pb2.ITEM_STATUS_COMPLETED: "completed",
    common_pb2.ITEM_STATUS_INCOMPLETE: "incomplete",
    common_pb2.ITEM_STATUS_IN_PROGRESS: "in_progress",
}
# Which content part types each role may send, and how they are stored.
_PART_TYPES = {
    "user": {"input_text": common_pb2.CONTENT_TYPE_INPUT_TEXT},
    "system": {"input_text": common_pb2.CONTENT_TYPE_INPUT_TEXT},
    "assistant": {
        "output_text": common_pb2.CONTENT_TYPE_OUTPUT_TEXT,
        "text": common_pb2.CONTENT_TYPE_OUTPUT_TEXT,
    },
}
_UNSUPPORTED_PARTS = {"input_audio", "input_image", "output_audio", "audio"}

_C = common_pb2


def item_from_client(raw: Any, param: str = "item") -> common_pb2.Item:
    """Validate a client `conversation.item.create` item and convert it.

    Raises:
        InvalidRequest: naming the offending field.
    """
    if raw is None:
        raise missing_parameter(param)
    if not isinstance(raw, dict):
        raise invalid_value(param, f"Invalid type for '{param}': expected an object.")
    item_id = fields.optional_id(raw, "id", param)
    kind = fields.require_str(raw, "type", param)
    if kind == "message":
        return _message_from_client(raw, item_id, param)
    if kind == "function_call_output":
        return _C.Item(
            id=item_id,
            type=_C.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
            status=_C.ITEM_STATUS_COMPLETED,
            call_id=fields.require_id(raw, "call_id", param),
            output=fields.require_str(raw, "output", param),
        )
    if kind == "mcp_approval_response":
        return _approval_response(raw, item_id, param)
    if kind == "function_call":
        return _C.Item(
            id=item_id,
            type=_C.ITEM_TYPE_FUNCTION_CALL,
            status=_C.ITEM_STATUS_COMPLETED,
            call_id=fields.require_id(raw, "call_id", param),
            name=bounds.check_tool_name(fields.require_str(raw, "name", param), f"{param}.name"),
            arguments=fields.optional_str(raw, "arguments", param) or "{}",
        )
    raise invalid_value(
        f"{param}.type",
        f"Invalid value: {quote(kind)}. Supported values are: 'message', 'function_call', "
        "'function_call_output' and 'mcp_approval_response'.",
    )


def _approval_response(raw: dict[str, Any], item_id: str, param: str) -> common_pb2.Item:
    """A client's answer to an `mcp_approval_request`."""
    approve = raw.get("approve")
    if approve is None:
        raise missing_parameter(f"{param}.approve")
    if not isinstance(approve, bool):
        raise invalid_value(
            f"{param}.approve", f"Invalid type for '{param}.approve': expected a boolean."
        )
    reason = fields.optional_str(raw, "reason", param)
    return _C.Item(
        id=item_id,
        type=_C.ITEM_TYPE_MCP_APPROVAL_RESPONSE,
        status=_C.ITEM_STATUS_COMPLETED,
        approval_request_id=fields.require_id(raw, "approval_request_id", param),
        approve=approve,
        reason=bounds.check_chars(reason, f"{param}.reason", bounds.MAX_TOOL_DESCRIPTION_CHARS),
    )


def _message_from_client(raw: dict[str, Any], item_id: str, param: str) -> common_pb2.Item:
    role = fields.require_str(raw, "role", param)
    if role not in _ROLES:
        raise invalid_value(
            f"{param}.role",
            f"Invalid value: {quote(role)}. Supported values are: 'user', 'assistant', "
            "and 'system'.",
        )
    content = raw.get("content")
    if content is None:
        raise missing_parameter(f"{param}.content")
    if not isinstance(content, list) or not content:
        raise invalid_value(f"{param}.content", f"'{param}.content' must be a non-empty array.")
    allowed = _PART_TYPES[role]
    parts = []
    for index, part in enumerate(content):
        where = f"{param}.content[{index}]"
        if not isinstance(part, dict):
            raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
        part_type = fields.require_str(part, "type", where)
        if part_type in _UNSUPPORTED_PARTS:
            raise InvalidRequest(
                f"Content type {quote(part_type)} is not supported: Switchboard serves text.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{where}.type",
            )
        if part_type not in allowed:
            supported = ", ".join(f"'{t}'" for t in allowed)
            raise invalid_value(
                f"{where}.type",
                f"Invalid value: {quote(part_type)} for a {role} message. Supported: {supported}.",
            )
        parts.append(
            _C.ContentPart(type=allowed[part_type], text=fields.require_str(part, "text", where))
        )
    return _C.Item(
        id=item_id,
        type=_C.ITEM_TYPE_MESSAGE,
        role=_ROLES[role],
        status=_C.ITEM_STATUS_COMPLETED,
        content=parts,
    )


def item_to_json(item: common_pb2.Item) -> dict[str, Any]:
    """The Realtime JSON form of a stored item."""
    status = _STATUS_NAMES.get(item.status, "completed")
    if item.type == _C.ITEM_TYPE_FUNCTION_CALL:
        return {
            "id": item.id,
            "object": "realtime.item",
            "type": "function_call",
            "status": status,
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
        }
    if item.type == _C.ITEM_TYPE_FUNCTION_CALL_OUTPUT:
        return {
            "id": item.id,
            "object": "realtime.item",
            "type": "function_call_output",
            "call_id": item.call_id,
            "output": item.output,
        }
    if item.type in _MCP_TYPES:
        return _mcp_item_to_json(item)
    role = _ROLE_NAMES.get(item.role, "user")
    return {
        "id": item.id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": role,
        "content": [_part_to_json(part) for part in item.content],
    }


_MCP_TYPES = frozenset(
    {
        _C.ITEM_TYPE_MCP_CALL,
        _C.ITEM_TYPE_MCP_LIST_TOOLS,
        _C.ITEM_TYPE_MCP_APPROVAL_REQUEST,
        _C.ITEM_TYPE_MCP_APPROVAL_RESPONSE,
    }
)


def _mcp_item_to_json(item: common_pb2.Item) -> dict[str, Any]:
    base: dict[str, Any] = {"id": item.id, "object": "realtime.item"}
    if item.type == _C.ITEM_TYPE_MCP_LIST_TOOLS:
        tools = orjson.loads(item.tools_json) if item.tools_json else []
        return {**base, "type": "mcp_list_tools", "server_label": item.server_label, "tools": tools}
    if item.type == _C.ITEM_TYPE_MCP_APPROVAL_RESPONSE:
        return {
            **base,
            "type": "mcp_approval_response",
            "approval_request_id": item.approval_request_id,
            "approve": item.approve,
            "reason": item.reason or None,
        }
    call = {
        **base,
        "type": "mcp_approval_request",
        "server_label": item.server_label,
        "name": item.name,
        "arguments": item.arguments,
    }
    if item.type == _C.ITEM_TYPE_MCP_APPROVAL_REQUEST:
        return call
    return {
        **call,
        "type": "mcp_call",
        "approval_request_id": item.approval_request_id or None,
        "output": item.output or None,
        "error": orjson.loads(item.error_json) if item.error_json else None,
    }


def _part_to_json(part: common_pb2.ContentPart) -> dict[str, Any]:
    if part.type == _C.CONTENT_TYPE_OUTPUT_TEXT:
        return {"type": "output_text", "text": part.text}
    return {"type": "input_text", "text": part.text}


def assistant_message(
    item_id: str, text: str, *, status: common_pb2.ItemStatus.ValueType, response_id: str
) -> common_pb2.Item:
    """The assistant message item a response produced."""
    return _C.Item(
        id=item_id,
        type=_C.ITEM_TYPE_MESSAGE,
        role=_C.ROLE_ASSISTANT,
        status=status,
        content=[_C.ContentPart(type=_C.CONTENT_TYPE_OUTPUT_TEXT, text=text)],
        response_id=response_id,
    )
