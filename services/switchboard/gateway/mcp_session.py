"""The MCP servers of one session: listing their tools, offering them, running calls.

A session lists a server's tools once, when a `session.update` (or a
`response.create`) first offers it, through toolexec (`ListMcpTools`): an
`mcp_list_tools` item is added (`mcp_list_tools.in_progress`), stored, and done
(`mcp_list_tools.completed`), or the listing fails (`mcp_list_tools.failed` and
an `error` event) and is tried again on the next response. A listing already
running is awaited, never started twice.

Each response offers the model the listed tools of the servers its command
names (`<label>__<tool>`, within the client's `allowed_tools`), and knows which
of them need the client's approval (the tenant's policy or the client's
`require_approval`). Calls run through toolexec (`Execute` with
`mcp_server_label`) when the model's stream ends; calls the client approved
since the last response run before the next response's model call, and a
denied one is answered to the model as a failed call. See `mcp_output.py` for
the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import orjson

from switchboard.errors import InvalidRequest, SwitchboardError
from switchboard.gateway import mcp_config
from switchboard.gateway.backends import Backends
from switchboard.gateway.mcp_output import McpEntry, McpName, output_text, tool_error
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

_C = common_pb2
NOT_APPROVED = "The user did not approve this call, so it was not made."


class McpSession:
    """The MCP state of one session on this connection."""

    def __init__(
        self,
        protocol: RealtimeProtocol,
        backends: Backends,
        tenant_id: str,
        *,
        publish: Callable[[], None],
    ) -> None:
        self.protocol = protocol
        self.backends = backends
        self.tenant_id = tenant_id
        self.session_id = protocol.session_id
        self.publish = publish
        self._listed: dict[str, list[toolexec_pb2.McpTool]] = {}
        self._listing: dict[str, asyncio.Task[None]] = {}
        # Approval requests already acted on (run or refused).
        self._answered: set[str] = set()

    # --- listings -------------------------------------------------------------------

    async def list_new(self, configs: Iterable[common_pb2.McpToolConfig]) -> None:
        """List the tools of every server in `configs` not listed yet, in order."""
        for config in configs:
            if config.server_label not in self._listed:
                await list_once(self._listing, config.server_label, self._list_once)

    async def _list_once(self, label: str) -> None:
        protocol, item_id = self.protocol, self.protocol.ids.new("item")
        protocol.mcp_list_tools_started(item_id, label)
        self.publish()
        try:
            reply = await self.backends.list_mcp_tools(self.tenant_id, self.session_id, label)
            if reply.error_code:
                raise SwitchboardError(reply.error_message, code=reply.error_code, param=label)
            tools = [tool_json(tool) for tool in reply.tools]
            item = _C.Item(
                id=item_id,
                type=_C.ITEM_TYPE_MCP_LIST_TOOLS,
                status=_C.ITEM_STATUS_COMPLETED,
                server_label=label,
                tools_json=orjson.dumps(tools).decode(),
            )
            stored = await self.backends.append_item(self.tenant_id, self.session_id, item)
        except SwitchboardError as exc:
            log.info(
                "mcp tools not listed",
                extra={
                    "tenant_id": self.tenant_id,
                    "session_id": self.session_id,
                    "code": exc.name,
                },
            )
            protocol.mcp_list_tools_failed(item_id, exc)
            self.publish()
            return
        self._listed[label] = list(reply.tools)
        protocol.mcp_list_tools_completed(stored.item)
        self.publish()

    # --- what a response offers -----------------------------------------------------

    def offered(
        self, configs: Iterable[common_pb2.McpToolConfig]
    ) -> tuple[list[common_pb2.ToolDefinition], dict[str, McpName]]:
        """The function tools that stand for the listed MCP tools, and what each
        name calls (with whether the call needs approval)."""
        tools: list[common_pb2.ToolDefinition] = []
        names: dict[str, McpName] = {}
        for config in configs:
            label = config.server_label
            for tool in self._listed.get(label, ()):
                if not mcp_config.client_allows(config, tool.name):
                    continue
                name = f"{label}__{tool.name}"
                approval = tool.requires_approval or mcp_config.client_wants_approval(
                    config, tool.name
                )
                names[name] = McpName(label, tool.name, approval)
                tools.append(
                    _C.ToolDefinition(
                        name=name,
                        description=tool.description,
                        parameters_json=tool.input_schema_json,
                        location=_C.TOOL_LOCATION_SERVER,
                    )
                )
        return tools, names

    # --- calls ----------------------------------------------------------------------

    async def answer_approvals(self, response_id: str) -> list[common_pb2.Item]:
        """Open and run (or refuse) the calls the client answered since the last
        response, in the response `response_id`, before its model call.

        Returns:
            The calls' items, for the context of the model call (they are stored
            with the rest of the response's output).
        """
        answers, self.protocol.approvals = self.protocol.approvals, []
        if not answers:
            return []
        output = self.protocol.mcp_output(response_id)
        opened: list[McpEntry] = []
        for answer in answers:
            request_id = answer.approval_request_id
            if request_id in self._answered:
                continue
            try:
                request = await self.backends.get_item(self.tenant_id, self.session_id, request_id)
                if request.type != _C.ITEM_TYPE_MCP_APPROVAL_REQUEST:
                    raise InvalidRequest(
                        f"The item '{request_id}' is not an mcp_approval_request.",
                        code=_C.ERROR_CODE_ITEM_NOT_FOUND,
                        param="item.approval_request_id",
                    )
            except SwitchboardError as exc:
                self.protocol.fail(exc)
                continue
            self._answered.add(request_id)
            entry = McpEntry(
                self.protocol.ids.new("item"),
                -1,
                request.call_id,
                McpName(request.server_label, request.name, needs_approval=False),
                approval=False,
                arguments=[request.arguments],
                approval_request_id=request_id,
            )
            output.open_mcp_call(entry)
            if not answer.approve:
                entry.started = True  # nothing runs: no arguments.done, no in_progress
                reason = f" Reason given: {answer.reason}" if answer.reason else ""
                output.mcp_call_finished(
                    entry, output=None, error=tool_error(NOT_APPROVED + reason)
                )
            opened.append(entry)
        self.publish()
        await self.run_calls(response_id, output.pending_mcp_calls())
        return [entry.item(response_id, _C.ITEM_STATUS_COMPLETED) for entry in opened]

    async def run_calls(self, response_id: str, entries: list[McpEntry]) -> None:
        """Run `entries` in parallel through toolexec; each ends completed or failed."""
        if not entries:
            return
        output = self.protocol.mcp_output(response_id)
        for entry in entries:
            output.mcp_call_started(entry)
        self.publish()
        results = await execute(self.backends, self.tenant_id, self.session_id, entries)
        for entry, result in zip(entries, results, strict=True):
            if result.outcome == toolexec_pb2.TOOL_OUTCOME_OK:
                output.mcp_call_finished(entry, output=output_text(result.output), error=None)
            else:
                output.mcp_call_finished(entry, output=None, error=tool_error(result.error_message))
        self.publish()


async def list_once(
    listing: dict[str, asyncio.Task[None]], label: str, list_tools: Callable[[str], Awaitable[None]]
) -> None:
    """Await the listing of `label`'s tools, started unless one runs (`listing`:
    those running, by label): a listing is never started twice at once."""
    task = listing.get(label)
    if task is None:

        async def run() -> None:
            try:
                await list_tools(label)
            finally:
                listing.pop(label, None)

        task = listing[label] = asyncio.create_task(run())
    await asyncio.shield(task)


async def execute(
    backends: Backends, tenant_id: str, session_id: str, entries: list[McpEntry]
) -> list[toolexec_pb2.ExecuteResponse]:
    """Run MCP calls in parallel through toolexec; one answer per call, in order
    (never raises: an unreachable toolexec is an outcome too)."""
    return list(
        await asyncio.gather(
            *(
                backends.execute_tool(
                    tenant_id,
                    session_id,
                    entry.call_id,
                    entry.name.tool,
                    entry.text,
                    mcp_server_label=entry.name.server_label,
                )
                for entry in entries
            )
        )
    )


def tool_json(tool: toolexec_pb2.McpTool) -> dict[str, object]:
    """A tool of an `mcp_list_tools` item."""
    return {
        "name": tool.name,
        "description": tool.description or None,
        "input_schema": orjson.loads(tool.input_schema_json or "{}"),
        "annotations": orjson.loads(tool.annotations_json) if tool.annotations_json else None,
    }
