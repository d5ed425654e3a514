"""The MCP servers a voice session offers (docs/voice.md#mcp-tools): their
listings, and the functions that stand for their tools upstream.

A server is listed through toolexec when a `session.update` or `response.create`
first offers it (the client sees the `mcp_list_tools` item and its events, as in
text sessions; a listing already running is awaited, never started twice); a
failed listing is tried again later. Each listed tool the client's
`allowed_tools` lets through is declared upstream as a function
`<label>__<tool>`, noting whether its calls need the client's approval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from switchboard.errors import SwitchboardError
from switchboard.gateway import mcp_config
from switchboard.gateway.backends import Backends
from switchboard.gateway.mcp_output import McpName
from switchboard.gateway.mcp_session import list_once, tool_json
from switchboard.gateway.voice_outbox import error_event, local_event
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]


def is_mcp(tool: Any) -> bool:
    return isinstance(tool, dict) and tool.get("type") == "mcp"


class McpOffer:
    """The MCP servers of one voice session (see the module).

    Args:
        backends: toolexec, for listing.
        servers: the tenant's registered MCP servers by label.
        new_id: a new item id (`item_...`).
        to_client: sends one event (JSON text) to the client.
    """

    def __init__(
        self,
        backends: Backends,
        tenant_id: str,
        session_id: str,
        servers: mcp_config.Servers,
        *,
        new_id: Callable[[], str],
        to_client: Callable[[str], None],
    ) -> None:
        self.backends = backends
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.servers = servers
        self.new_id = new_id
        self.to_client = to_client
        # The session's `mcp` tools as the client sent them (shown in its echoes).
        self.session_tools: list[Event] = []
        self._listed: dict[str, list[toolexec_pb2.McpTool]] = {}
        self._listing: dict[str, asyncio.Task[None]] = {}
        # The function names declared upstream for MCP tools.
        self.names: dict[str, McpName] = {}

    def configs(self, raw: list[Event], param: str) -> list[common_pb2.McpToolConfig]:
        _, configs = mcp_config.split_tools(raw, param, self.servers)
        return configs

    def unlisted(self, raw: list[Event], param: str) -> list[common_pb2.McpToolConfig]:
        """The servers among `raw` whose tools are not listed yet."""
        return [c for c in self.configs(raw, param) if c.server_label not in self._listed]

    async def list_new(self, configs: Iterable[common_pb2.McpToolConfig]) -> None:
        """List the tools of every server in `configs` not listed yet, in order; a
        listing already running is awaited, never started twice."""
        for config in configs:
            if config.server_label not in self._listed:
                await list_once(self._listing, config.server_label, self._list_once)

    async def _list_once(self, label: str) -> None:
        item_id = self.new_id()
        item: Event = {
            "id": item_id,
            "object": "realtime.item",
            "type": "mcp_list_tools",
            "server_label": label,
            "tools": [],
        }
        self.to_client(local_event("conversation.item.added", previous_item_id=None, item=item))
        self.to_client(local_event("mcp_list_tools.in_progress", item_id=item_id))
        try:
            reply = await self.backends.list_mcp_tools(self.tenant_id, self.session_id, label)
            if reply.error_code:
                raise SwitchboardError(reply.error_message, code=reply.error_code, param=label)
        except SwitchboardError as exc:
            log.info(
                "mcp tools not listed",
                extra={
                    "tenant_id": self.tenant_id,
                    "session_id": self.session_id,
                    "code": exc.name,
                },
            )
            self.to_client(local_event("mcp_list_tools.failed", item_id=item_id))
            self.to_client(error_event(exc))
            return
        self._listed[label] = list(reply.tools)
        item["tools"] = [tool_json(tool) for tool in reply.tools]
        self.to_client(local_event("mcp_list_tools.completed", item_id=item_id))
        self.to_client(local_event("conversation.item.done", previous_item_id=None, item=item))

    def functions(
        self, configs: Iterable[common_pb2.McpToolConfig], taken: set[str]
    ) -> list[Event]:
        """The Realtime function tools that stand for the listed tools of `configs`
        (within the client's `allowed_tools`; not a name in `taken`, the client's
        own), noting which calls need the client's approval (the tenant's policy or
        the client's `require_approval`)."""
        tools: list[Event] = []
        for config in configs:
            label = config.server_label
            for tool in self._listed.get(label, ()):
                name = f"{label}__{tool.name}"
                if not mcp_config.client_allows(config, tool.name) or name in taken:
                    continue
                approval = tool.requires_approval or mcp_config.client_wants_approval(
                    config, tool.name
                )
                self.names[name] = McpName(label, tool.name, needs_approval=approval)
                parameters = orjson.loads(tool.input_schema_json or "{}")
                tools.append(
                    {
                        "type": "function",
                        "name": name,
                        "description": tool.description,
                        "parameters": parameters,
                    }
                )
        return tools

    def owns(self, name: Any) -> bool:
        """Whether a function name the upstream calls is an MCP tool's."""
        return name in self.names

    def runs(self, name: Any) -> bool:
        """Whether the gateway runs a call of `name` when the response ends (an MCP
        tool's that needs no approval)."""
        mcp = self.names.get(name) if isinstance(name, str) else None
        return mcp is not None and not mcp.needs_approval
