"""The tools of the tenants' MCP servers, as toolexec lists and runs them.

A server's listing is cached for its `tools_ttl_s` (per toolexec process, keyed
by tenant, label and URL, so a reloaded URL is listed afresh); callers asking
while a listing runs wait for it rather than starting another, and a failed
listing is not kept. A listing keeps only the tools a client may use: those
the tenant allows (`allowed_tools`), whose name the model can call
(`<label>__<name>` within OpenAI's function-name rule) and whose input schema
is an object schema toolexec can validate; the others are left out and logged
once per listing.

Each usable tool becomes a `Tool` whose executor calls the server, with the
server's timeout and a concurrency limit per server (kept across reloads while
it is unchanged), so a call goes through the same claim, timeout, idempotency,
metrics and span as every other tool (`service.ToolExecServicer`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from switchboard.tenancy import McpServer
from switchboard.toolexec.catalog import WebhookSlots
from switchboard.toolexec.mcp_client import McpClient, McpFailure, McpToolInfo
from switchboard.toolexec.registry import TOOL_NAME, CallInfo, Tool, ToolFailed
from switchboard.toolexec.validation import SchemaError

log = logging.getLogger(__name__)

# Between the label and the tool's name in the name the model calls.
NAME_SEPARATOR = "__"


def model_name(label: str, tool: str) -> str:
    """The function name the model calls a server's tool by."""
    return f"{label}{NAME_SEPARATOR}{tool}"


@dataclass(frozen=True, slots=True)
class McpListing:
    """The usable tools of one server, by their MCP name."""

    tools: dict[str, Tool]
    infos: dict[str, McpToolInfo]


class McpTools:
    """Listings and calls of every tenant's MCP servers, for one toolexec process.

    Args:
        client: the MCP client.
        clock: monotonic seconds; tests drive it.
    """

    def __init__(self, client: McpClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, McpListing]] = {}
        self._listing: dict[tuple[str, str, str], asyncio.Task[McpListing]] = {}
        self._slots = WebhookSlots()

    async def listing(self, tenant_id: str, server: McpServer) -> McpListing:
        """The server's usable tools, from the cache or listed now.

        Raises:
            McpFailure: the server could not list its tools.
        """
        key = (tenant_id, server.label, server.url)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        task = self._listing.get(key)
        if task is None:
            task = asyncio.create_task(self._list(tenant_id, server))
            self._listing[key] = task
            task.add_done_callback(lambda _: self._listing.pop(key, None))
        # Shielded: one caller giving up must not cancel the others' listing.
        listing = await asyncio.shield(task)
        self._cache[key] = (self._clock() + server.tools_ttl_s, listing)
        return listing

    def semaphore(self, tenant_id: str, server: McpServer) -> asyncio.Semaphore:
        """The semaphore of the server's `max_concurrency`, kept while it is unchanged."""
        return self._slots.keyed((tenant_id, "mcp:" + server.label), server.max_concurrency)

    async def _list(self, tenant_id: str, server: McpServer) -> McpListing:
        infos = await self.client.list_tools(server)
        tools: dict[str, Tool] = {}
        kept: dict[str, McpToolInfo] = {}
        skipped: list[str] = []
        for info in infos:
            if not server.allows(info.name) or info.name in tools:
                continue
            tool = self._tool(server, info)
            if tool is None:
                skipped.append(info.name[:64])
                continue
            tools[info.name] = tool
            kept[info.name] = info
        if skipped:
            log.warning(
                "mcp tools left out",
                extra={
                    "tenant_id": tenant_id,
                    "server_label": server.label,
                    "tools": skipped[:20],
                    "reason": "name or input schema unusable",
                },
            )
        return McpListing(tools, kept)

    def _tool(self, server: McpServer, info: McpToolInfo) -> Tool | None:
        name = model_name(server.label, info.name)
        if not TOOL_NAME.fullmatch(name):
            return None
        client = self.client

        async def call(arguments: dict[str, Any], _: CallInfo) -> Any:
            try:
                return await client.call_tool(server, info.name, arguments)
            except McpFailure as exc:
                raise ToolFailed(exc.message) from None

        try:
            return Tool(
                name=name,
                description=info.description[:1024],
                parameters=info.input_schema,
                executor=call,
                # The call's deadline (the client's own is a second later, a backstop).
                timeout_s=server.timeout_s,
                max_concurrency=server.max_concurrency,
            )
        except (ValueError, SchemaError):
            return None
