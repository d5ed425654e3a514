"""`MemoryBackends`: the session service, toolexec and the broker, in memory."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import orjson

from switchboard.errors import ItemNotFound, SessionNotFound, SessionTakenOver, SwitchboardError
from switchboard.gateway.testing.model import Fail, Script, ScriptedCall, ScriptedModel
from switchboard.tokens import estimate_tokens
from switchboard.v1 import broker_pb2, common_pb2, moderation_pb2, session_pb2, toolexec_pb2

Event = dict[str, Any]


@dataclass
class _Session:
    session: session_pb2.Session
    items: list[common_pb2.Item] = field(default_factory=list)
    events: list[session_pb2.SessionEvent] = field(default_factory=list)
    owner: str = ""
    owner_until: float = 0.0
    wanted: str = ""
    broker_response: str = ""
    broker: str = ""

    def lease_holder(self) -> str:
        return self.owner if self.owner and self.owner_until > time.monotonic() else ""


@dataclass
class CannedTool:
    """A toolexec tool that answers with `output`, or `outcome`/`error` when it fails."""

    definition: common_pb2.ToolDefinition
    output: str = '{"ok": true}'
    outcome: toolexec_pb2.ToolOutcome.ValueType = toolexec_pb2.TOOL_OUTCOME_OK
    error: str = ""
    # Set to make the tool wait for the test.
    gate: asyncio.Event | None = None


def canned_tool(name: str, output: str = '{"ok": true}', **kwargs: Any) -> CannedTool:
    definition = common_pb2.ToolDefinition(
        name=name,
        description=f"The canned tool {name}.",
        parameters_json='{"type": "object"}',
        location=common_pb2.TOOL_LOCATION_SERVER,
    )
    return CannedTool(definition, output, **kwargs)


class MemoryBackends:
    """The `Backends` of the gateway, in memory. See the module docstring.

    Attributes:
        model: the scripted broker.
        tools: toolexec's tools by name.
        failures: a method name -> the error its calls raise (until removed).
        gates: a method name -> an event its calls wait for (until set).
        calls: how many times each method was called.
    """

    def __init__(self) -> None:
        self.model = ScriptedModel()
        self.tools: dict[str, CannedTool] = {}
        self.failures: dict[str, SwitchboardError] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.tool_calls: list[toolexec_pb2.ExecuteRequest] = []
        self.calls: Counter[str] = Counter()
        # MCP listings by server label (an unknown label is not registered).
        self.mcp_listings: dict[str, toolexec_pb2.ListMcpToolsResponse] = {}
        self.moderated: list[list[str]] = []
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._ids = count(1)
        self._background: set[asyncio.Task[None]] = set()

    async def _enter(self, method: str) -> None:
        self.calls[method] += 1
        gate = self.gates.get(method)
        if gate is not None:
            await gate.wait()
        error = self.failures.get(method)
        if error is not None:
            raise error

    def _get(self, tenant_id: str, session_id: str) -> _Session:
        state = self._sessions.get((tenant_id, session_id))
        if state is None:
            raise SessionNotFound(f"Session '{session_id[:64]}' not found.")
        return state

    def forget(self, tenant_id: str, session_id: str) -> None:
        """Lose a session, as a Redis restarted without its data would."""
        del self._sessions[(tenant_id, session_id)]

    def items(self, tenant_id: str, session_id: str) -> list[common_pb2.Item]:
        """The session's items, in order (for assertions)."""
        return list(self._get(tenant_id, session_id).items)

    def noted_broker(self, tenant_id: str, session_id: str) -> tuple[str, str]:
        """The last broker note of the session: (response id, broker address)."""
        state = self._get(tenant_id, session_id)
        return state.broker_response, state.broker

    def logged(self, tenant_id: str, session_id: str) -> list[Event]:
        """The session's event log, decoded (for assertions)."""
        return [orjson.loads(e.payload) for e in self._get(tenant_id, session_id).events]

    # --- session ------------------------------------------------------------------------

    async def create_session(
        self, tenant_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        await self._enter("create_session")
        session = session_pb2.Session(
            id=f"sess_mem{next(self._ids)}", tenant_id=tenant_id, config=config
        )
        self._sessions[tenant_id, session.id] = _Session(session)
        return session_pb2.Session.FromString(session.SerializeToString())

    async def get_session(self, tenant_id: str, session_id: str) -> session_pb2.Session:
        await self._enter("get_session")
        state = self._get(tenant_id, session_id)
        copy = session_pb2.Session.FromString(state.session.SerializeToString())
        if state.broker_response and state.broker_response == copy.open_response_id:
            copy.open_response_broker = state.broker
        return copy

    async def update_session(
        self, tenant_id: str, session_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        await self._enter("update_session")
        state = self._get(tenant_id, session_id)
        state.session.config.CopyFrom(config)
        return await self.get_session(tenant_id, session_id)

    async def append_item(
        self,
        tenant_id: str,
        session_id: str,
        item: common_pb2.Item,
        previous_item_id: str = "",
        *,
        context_tokens: int | None = None,
    ) -> session_pb2.AppendItemResponse:
        await self._enter("append_item")
        state = self._get(tenant_id, session_id)
        ids = [existing.id for existing in state.items]
        if item.id in ids:
            raise SwitchboardError(
                f"Item '{item.id}' already exists.", code=common_pb2.ERROR_CODE_INVALID_VALUE
            )
        if previous_item_id in ("", "root"):
            at = len(ids) if previous_item_id == "" else 0
        elif previous_item_id in ids:
            at = ids.index(previous_item_id) + 1
        else:
            raise ItemNotFound(f"Item '{previous_item_id[:64]}' not found.")
        stored = common_pb2.Item()
        stored.CopyFrom(item)
        state.items.insert(at, stored)
        before = state.items[at - 1].id if at else ""
        reply = session_pb2.AppendItemResponse(item=stored, previous_item_id=before)
        if context_tokens is not None:
            self.calls["append_item_with_context"] += 1
            reply.context.CopyFrom(self._context(state))
        return reply

    async def get_item(self, tenant_id: str, session_id: str, item_id: str) -> common_pb2.Item:
        await self._enter("get_item")
        for item in self._get(tenant_id, session_id).items:
            if item.id == item_id:
                return item
        raise ItemNotFound(f"Item '{item_id[:64]}' not found.")

    async def delete_item(self, tenant_id: str, session_id: str, item_id: str) -> None:
        await self._enter("delete_item")
        state = self._get(tenant_id, session_id)
        state.items = [item for item in state.items if item.id != item_id]

    async def build_context(
        self,
        tenant_id: str,
        session_id: str,
        *,
        max_context_tokens: int = 0,
        include_unsummarized: bool = False,
    ) -> session_pb2.Context:
        """Every item (no budget), the instructions, chars/4 tokens."""
        await self._enter("build_context")
        return self._context(self._get(tenant_id, session_id))

    @staticmethod
    def _context(state: _Session) -> session_pb2.Context:
        chars = len(state.session.config.instructions) + sum(
            len(part.text) for item in state.items for part in item.content
        )
        return session_pb2.Context(
            instructions=state.session.config.instructions,
            items=state.items,
            estimated_tokens=estimate_tokens(chars),
        )

    # --- event log and lease ------------------------------------------------------------

    async def append_events_batch(
        self, request: session_pb2.AppendEventsBatchRequest
    ) -> session_pb2.AppendEventsBatchResponse:
        await self._enter("append_events_batch")
        reply = session_pb2.AppendEventsBatchResponse()
        for append in request.appends:
            try:
                reply.results.add(last_seq=self._append(append))
            except SwitchboardError as error:
                reply.results.add(error_code=error.code, error_message=error.message)
        return reply

    def _append(self, request: session_pb2.AppendEventsRequest) -> int:
        state = self._get(request.tenant_id, request.session_id)
        if request.release_lease:
            if state.owner == request.holder:
                state.owner = ""
            return 0
        holder = state.lease_holder()
        if request.holder and holder and holder != request.holder:
            raise SessionTakenOver("Another connection holds this session.")
        seq = state.session.last_event_seq
        for event in request.events:
            if event.seq and event.seq <= seq:
                raise SwitchboardError(
                    "Event seqs must increase.", code=common_pb2.ERROR_CODE_INVALID_VALUE
                )
            seq = event.seq or seq + 1
            state.events.append(
                session_pb2.SessionEvent(seq=seq, event_id=event.event_id, payload=event.payload)
            )
        if request.holder:
            state.owner = request.holder
            state.owner_until = time.monotonic() + request.lease_ms / 1000
        if request.HasField("open_response_id"):
            state.session.open_response_id = request.open_response_id
            state.session.open_response_seq = request.open_response_seq
        if request.broker_response_id:
            state.broker_response, state.broker = request.broker_response_id, request.broker_address
        state.session.last_event_seq = seq
        return seq

    async def read_events(
        self, tenant_id: str, session_id: str, after_seq: int, limit: int = 0
    ) -> session_pb2.ReadEventsResponse:
        await self._enter("read_events")
        state = self._get(tenant_id, session_id)
        events = [event for event in state.events if event.seq > after_seq]
        return session_pb2.ReadEventsResponse(
            events=events[: limit or 256], last_seq=state.session.last_event_seq
        )

    async def claim_session(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse:
        await self._enter("claim_session")
        return self._claim(tenant_id, session_id, holder, lease_ms)

    async def claim_sessions_batch(
        self, claims: list[session_pb2.ClaimSessionRequest]
    ) -> session_pb2.ClaimSessionsBatchResponse:
        await self._enter("claim_sessions_batch")
        reply = session_pb2.ClaimSessionsBatchResponse()
        for c in claims:
            try:
                reply.results.add(
                    claim=self._claim(c.tenant_id, c.session_id, c.holder, c.lease_ms)
                )
            except SwitchboardError as error:
                reply.results.add(error_code=error.code, error_message=error.message)
        return reply

    def _claim(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse:
        state = self._get(tenant_id, session_id)
        last = state.session.last_event_seq
        owner = state.lease_holder()
        if owner and owner != holder:
            state.wanted = holder
            return session_pb2.ClaimSessionResponse(claimed=False, last_event_seq=last)
        state.owner, state.owner_until = holder, time.monotonic() + lease_ms / 1000
        wanted = bool(state.wanted) and state.wanted != holder
        if state.wanted == holder:
            state.wanted = ""
        return session_pb2.ClaimSessionResponse(
            claimed=True, handoff_requested=wanted, last_event_seq=last
        )

    # --- broker -------------------------------------------------------------------------

    def generate(self, request: broker_pb2.GenerateRequest) -> ScriptedCall:
        self.model.requests.append(request)
        script = self.model.next_script()
        self.model.held[request.response_id] = script
        return ScriptedCall(script, self.model, request.response_id)

    def attach(self, broker: str, tenant_id: str, response_id: str) -> ScriptedCall:
        """Plays the held call's script again from its start (the broker's snapshot
        merges what was produced; repeating it is what the gateway must absorb), or
        fails with `response_interrupted` when the call is not held."""
        self.model.attached.append((broker, response_id))
        script = self.model.held.get(response_id)
        if script is None or response_id in self.model.cancelled:
            script = Script([Fail("response_interrupted", "No such call.")], broker)
        return ScriptedCall(script, self.model, response_id)

    def cancel_generate(self, broker: str, tenant_id: str, response_id: str) -> None:
        self.model.cancelled.append(response_id)

    # --- toolexec -----------------------------------------------------------------------

    async def list_tools(self, tenant_id: str) -> list[common_pb2.ToolDefinition]:
        await self._enter("list_tools")
        return [tool.definition for tool in self.tools.values()]

    async def list_mcp_tools(
        self, tenant_id: str, session_id: str, server_label: str
    ) -> toolexec_pb2.ListMcpToolsResponse:
        await self._enter("list_mcp_tools")
        reply = self.mcp_listings.get(server_label)
        if reply is None:
            return toolexec_pb2.ListMcpToolsResponse(
                error_code=common_pb2.ERROR_CODE_MCP_SERVER_NOT_REGISTERED,
                error_message=f"No MCP server labelled {server_label[:64]!r}.",
            )
        return reply

    async def moderate(
        self, tenant_id: str, session_id: str, texts: list[str], timeout_s: float
    ) -> moderation_pb2.ModerateResponse:
        """Flags a text that holds `sbflag-<category>`, as the simulator does."""
        await self._enter("moderate")
        self.moderated.append(list(texts))
        results = []
        for text in texts:
            found = sorted(set(re.findall(r"sbflag-([a-z/-]+)", text.lower())))
            results.append(moderation_pb2.ModerationResult(flagged=bool(found), categories=found))
        return moderation_pb2.ModerateResponse(results=results, model="test")

    async def execute_tool(
        self,
        tenant_id: str,
        session_id: str,
        call_id: str,
        name: str,
        arguments: str,
        *,
        mcp_server_label: str = "",
    ) -> toolexec_pb2.ExecuteResponse:
        self.tool_calls.append(
            toolexec_pb2.ExecuteRequest(
                tenant_id=tenant_id,
                session_id=session_id,
                call_id=call_id,
                name=name,
                arguments=arguments,
                mcp_server_label=mcp_server_label,
            )
        )
        if mcp_server_label:
            name = f"{mcp_server_label}__{name}"
        tool = self.tools.get(name)
        if tool is None:
            return toolexec_pb2.ExecuteResponse(
                call_id=call_id,
                outcome=toolexec_pb2.TOOL_OUTCOME_UNKNOWN_TOOL,
                output=orjson.dumps({"error": "tool_not_found"}).decode(),
                error_code=common_pb2.ERROR_CODE_TOOL_NOT_FOUND,
                error_message=f"No tool named '{name[:64]}'.",
            )
        if tool.gate is not None:
            await tool.gate.wait()
        reply = toolexec_pb2.ExecuteResponse(
            call_id=call_id, outcome=tool.outcome, output=tool.output, error_message=tool.error
        )
        if tool.outcome != toolexec_pb2.TOOL_OUTCOME_OK:
            reply.error_code = common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED
        return reply

    # --- the process --------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        return {"session": True, "broker": True, "toolexec": True}

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
