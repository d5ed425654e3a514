"""MCP items in a response's output: `mcp_call` and `mcp_approval_request`.

The model calls an MCP server's tool by the function name `<label>__<tool>`
(`McpName`). `ResponseOutput` opens such a call as an `mcp_call` item, whose
arguments stream as `response.mcp_call_arguments.delta`; or, when the call
needs the client's approval, as an `mcp_approval_request` item (its arguments
are sent whole when it closes). When the model's stream ends, the turn runs
each pending call: `response.mcp_call_arguments.done`, then
`response.mcp_call.in_progress`, then `response.mcp_call.completed` or
`.failed`, and the item closes (`response.output_item.done`) with its output
or error. A call approved (or denied) by the client is opened whole at the
start of the next response, before the model speaks.

Pure state and events, no I/O, like `responses.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from switchboard.v1 import common_pb2

Event = dict[str, Any]
_C = common_pb2


@dataclass(frozen=True, slots=True)
class McpName:
    """What a function name the model calls stands for."""

    server_label: str
    tool: str
    needs_approval: bool


@dataclass(slots=True)
class McpEntry:
    """An `mcp_call` or `mcp_approval_request` item of a response's output."""

    item_id: str
    output_index: int
    call_id: str
    name: McpName
    approval: bool  # an `mcp_approval_request` (not run), else an `mcp_call`
    arguments: list[str] = field(default_factory=list)
    approval_request_id: str = ""
    # Set when the call ran (or was denied): its output text, or its error object.
    output: str | None = None
    error: Event | None = None
    started: bool = False

    @property
    def text(self) -> str:
        return "".join(self.arguments)

    def body(self, *, final: bool) -> Event:
        """The item's Realtime JSON (`final`: with its arguments and result)."""
        arguments = self.text if final else ""
        if self.approval:
            return {
                "id": self.item_id,
                "object": "realtime.item",
                "type": "mcp_approval_request",
                "server_label": self.name.server_label,
                "name": self.name.tool,
                "arguments": arguments,
            }
        return {
            "id": self.item_id,
            "object": "realtime.item",
            "type": "mcp_call",
            "server_label": self.name.server_label,
            "name": self.name.tool,
            "arguments": arguments,
            "approval_request_id": self.approval_request_id or None,
            "output": self.output if final else None,
            "error": self.error if final else None,
        }

    def item(self, response_id: str, status: common_pb2.ItemStatus.ValueType) -> common_pb2.Item:
        """The item to store."""
        return _C.Item(
            id=self.item_id,
            type=_C.ITEM_TYPE_MCP_APPROVAL_REQUEST if self.approval else _C.ITEM_TYPE_MCP_CALL,
            status=status,
            call_id=self.call_id,
            name=self.name.tool,
            server_label=self.name.server_label,
            arguments=self.text,
            output=self.output or "",
            error_json=orjson.dumps(self.error).decode() if self.error is not None else "",
            approval_request_id=self.approval_request_id,
            response_id=response_id,
        )


def tool_error(message: str) -> Event:
    """The `error` of an `mcp_call` whose tool failed (or was not approved)."""
    return {"type": "tool_execution_error", "message": message}


def output_text(output_json: str) -> str:
    """A tool's output (JSON text from toolexec) as the `mcp_call.output` string:
    a string result as itself, anything else as its JSON."""
    try:
        value = orjson.loads(output_json)
    except orjson.JSONDecodeError:
        return output_json
    return value if isinstance(value, str) else output_json
