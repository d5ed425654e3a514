"""What the protocol asks its driver to do: one command per client event that
needs I/O (store an item, start a response, ...). Each carries the client's
`event_id`, so an error it meets can name the event that caused it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class UpdateSession:
    config: session_pb2.SessionConfig
    session: Event
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class StoreItem:
    item: common_pb2.Item
    previous_item_id: str
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class DeleteItem:
    item_id: str
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class RetrieveItem:
    item_id: str
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class StartResponse:
    """Run one model response. `instructions` is None when not overridden;
    `mcp_tools` are the (registered) MCP servers offered to the model."""

    response_id: str
    model: str
    instructions: str | None
    tools: tuple[common_pb2.ToolDefinition, ...]
    tool_choice: str
    max_output_tokens: int
    metadata: Any
    client_event_id: str | None
    mcp_tools: tuple[common_pb2.McpToolConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class CancelResponse:
    response_id: str
    client_event_id: str | None


Command = UpdateSession | StoreItem | DeleteItem | RetrieveItem | StartResponse | CancelResponse
