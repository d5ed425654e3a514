"""Server-side tools (toolexec) in voice sessions (docs/voice.md#server-side-tools).

A voice session offers the upstream the tenant's toolexec tools beside the
client's function tools, as a text session offers them to the model: they are
added to every `tools` the session sends upstream (at the open, in
`session.update`, in `response.create`; a client tool of the same name wins)
and taken out of the `session.created`/`session.updated` the client sees, so
the client sees its own tools only. When an upstream response completes with
function calls to the tenant's tools (that the client did not declare too),
the gateway runs them
through toolexec (its limits, signing, errors, metrics and spans are the text
path's: the same `ServerTools`), answers each call upstream with a
`conversation.item.create` of its `function_call_output` (the client sees the
upstream's `conversation.item.added`/`.done` for it, and an `error` event for
a failed call, as a text client does), then asks for the follow-up response
with `response.create`, up to `max_tool_rounds` rounds in a row. When the
response also called client tools, the client answers those and asks for the
next response itself (as in text sessions).

Cancel and interrupt during a tool run: the calls run to their end (a tool may
have acted; every call gets its output upstream), but the follow-up response
is not asked for when, meanwhile, the client sent `response.cancel` (which
then goes no further: there is no upstream response to cancel),
`response.create` or `input_audio_buffer.commit`, or the user started
speaking (`input_audio_buffer.speech_started`), or a response started
upstream: the user has the turn.

Call order (VoiceConnection): `load()` before the open, `opening(session)`,
`client(event, kind, text)` for each checked client event, `session(event)`
for the upstream's session echoes, `wants(event)` and `upstream(event)` for
the other upstream events, `close()` at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from switchboard.errors import SwitchboardError
from switchboard.gateway.server_tools import ServerTools
from switchboard.gateway.voice_mcp import VoiceMcp
from switchboard.gateway.voice_mcp_offer import is_mcp
from switchboard.gateway.voice_outbox import error_event
from switchboard.telemetry import tracing
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]
_TRACER = tracing.tracer("switchboard.gateway.voice")
# Client events after which the user, not the gateway, asks for the next response.
_USER_TAKES_TURN = frozenset({"response.create", "response.cancel", "input_audio_buffer.commit"})


def tool_json(tool: common_pb2.ToolDefinition) -> Event:
    """A toolexec tool as a Realtime function tool."""
    parameters = orjson.loads(tool.parameters_json) if tool.parameters_json else {}
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": parameters,
    }


def tool_names(tools: Any) -> set[str]:
    """The names of a (checked) `tools` array's function tools."""
    if not isinstance(tools, list):
        return set()
    return {str(t["name"]) for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)}


class VoiceTools:
    """The toolexec tools of one voice session (see the module).

    Args:
        server: the tenant's tools, as the text path runs them.
        max_rounds: server-side tool rounds in a row before the loop stops.
        to_upstream: sends one event (JSON) to the upstream session.
        to_client: sends one event (JSON text) to the client.
        on_idle: a tool round ended with no follow-up response (for the drain).
        mcp: the session's MCP servers, whose calls are rounds' calls too.
        hold: holds the upstream's next events back (a response's MCP calls run).
        release: lets them go again.
    """

    def __init__(
        self,
        server: ServerTools,
        max_rounds: int,
        *,
        to_upstream: Callable[[bytes], None],
        to_client: Callable[[str], None],
        on_idle: Callable[[], None],
        mcp: VoiceMcp,
        hold: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self.server = server
        self.max_rounds = max_rounds
        self.to_upstream = to_upstream
        self.to_client = to_client
        self.on_idle = on_idle
        self.mcp = mcp
        self.hold = hold
        self.release = release
        # The client's session `tools` as it sent them (its `mcp` tools included).
        self.session_tools: list[Any] = []
        self.catalogue: dict[str, common_pb2.ToolDefinition] = {}
        # The function tools the client declared (session or response), by name.
        self.client_names: set[str] = set()
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # A follow-up `response.create` was sent and its `response.created` not seen.
        self._follow_up = False

    @property
    def busy(self) -> bool:
        """A tool round runs, or its follow-up response has not started yet."""
        return self._follow_up or (self._task is not None and not self._task.done())

    async def load(self) -> None:
        """Read the tenant's toolexec tools (none when toolexec cannot be reached)."""
        self.catalogue = await self.server.catalogue()

    # -- what goes upstream -----------------------------------------------------------

    def declared(self, client_tools: Any, param: str = "session.tools") -> list[Any]:
        """The client's function tools, the functions standing for the listed tools
        of its `mcp` tools, then the server tools it does not shadow."""
        given = list(client_tools) if isinstance(client_tools, list) else []
        tools = [tool for tool in given if not is_mcp(tool)]
        names = tool_names(tools)
        self.client_names |= names
        mcp = [tool for tool in given if is_mcp(tool)]
        if mcp:
            tools.extend(self.mcp.offer.functions(self.mcp.offer.configs(mcp, param), names))
        tools.extend(tool_json(t) for name, t in self.catalogue.items() if name not in names)
        return tools

    def opening(self, session: Event) -> Event:
        """The session configuration the upstream opens with, server tools added
        (an `mcp` tool of an `ek_` secret is listed once the session is open)."""
        if "tools" in session:
            self.session_tools = list(session["tools"])
            self.mcp.offer.session_tools = [tool for tool in self.session_tools if is_mcp(tool)]
        if self.catalogue or "tools" in session:
            session["tools"] = self.declared(session.get("tools"))
        return session

    async def prepare(self, event: Event, kind: str) -> None:
        """Before a checked client event goes upstream: list the tools of the MCP
        servers it offers for the first time; before a `response.create`, those of
        the session's servers whose listing failed (their tools are then declared
        upstream with a `session.update`)."""
        body = event.get("session") if kind == "session.update" else event.get("response")
        if kind not in ("session.update", "response.create"):
            return
        tools = body.get("tools") if isinstance(body, dict) else None
        if kind == "response.create":
            # Calls the client approved (or denied) since the last response: run,
            # answered upstream, and shown at the start of the response.
            for call_id, output in await self.mcp.answer_approvals():
                answer = {"type": "function_call_output", "call_id": call_id, "output": output}
                self.to_upstream(orjson.dumps({"type": "conversation.item.create", "item": answer}))
        if isinstance(tools, list):
            mcp = [tool for tool in tools if is_mcp(tool)]
            param = "session.tools" if kind == "session.update" else "response.tools"
            await self.mcp.offer.list_new(self.mcp.offer.unlisted(mcp, param))
        elif kind == "response.create":
            await self.list_session()

    async def list_session(self) -> None:
        """List the session's MCP servers not listed yet (an `ek_` secret's, at the
        open; one whose listing failed); declare what was listed upstream."""
        offer = self.mcp.offer
        unlisted = offer.unlisted(offer.session_tools, "session.tools")
        if not unlisted:
            return
        await offer.list_new(unlisted)
        if len(offer.unlisted(offer.session_tools, "session.tools")) < len(unlisted):
            update = {"type": "realtime", "tools": self.declared(self.session_tools)}
            self.to_upstream(orjson.dumps({"type": "session.update", "session": update}))

    def client(self, event: Event, kind: str, text: str) -> str | None:
        """A checked client event as it goes upstream (server tools added to its
        `tools`), or None when it goes no further (a `response.cancel` during a
        tool round)."""
        if self.busy and kind in _USER_TAKES_TURN:
            self._stopped = True
            if kind == "response.cancel" and self._task is not None and not self._task.done():
                return None
        body = event.get("session") if kind == "session.update" else event.get("response")
        if kind not in ("session.update", "response.create") or not isinstance(body, dict):
            return text
        if "tools" not in body:
            return text
        tools = body["tools"]
        if kind == "session.update":
            self.session_tools = list(tools)
            self.mcp.offer.session_tools = [tool for tool in tools if is_mcp(tool)]
        if not self.catalogue and not any(is_mcp(tool) for tool in tools):
            self.client_names |= tool_names(tools)
            return text
        param = "session.tools" if kind == "session.update" else "response.tools"
        body["tools"] = self.declared(tools, param)
        return orjson.dumps(event).decode()

    # -- what comes back --------------------------------------------------------------

    def session(self, event: Event) -> bytes | None:
        """A `session.created`/`.updated` without the server tools (the client sees its
        own), as JSON; None when it names none."""
        session = event.get("session")
        if not isinstance(session, dict) or not isinstance(session.get("tools"), list):
            return None
        tools = session["tools"]
        shown = [t for t in tools if self._client_tool(t)]
        if len(shown) == len(tools) and not self.mcp.offer.session_tools:
            return None
        # As a text session echoes them: the `mcp` tools as the client sent them.
        session["tools"] = shown + self.mcp.offer.session_tools
        return orjson.dumps(event)

    def _client_tool(self, tool: Any) -> bool:
        name = tool.get("name") if isinstance(tool, dict) else None
        return name in self.client_names or (
            name not in self.catalogue and not self.mcp.offer.owns(name)
        )

    def server_calls(self, event: Event) -> tuple[list[Event], bool]:
        """The function calls of a completed `response.done` that are toolexec's to
        run (to the tenant's tools, unless the client declared the name too), and
        whether the client has calls of its own to answer (any other name: as
        with OpenAI, a voice client answers the calls it did not leave to us)."""
        response = event.get("response") or {}
        if response.get("status") != "completed":
            return [], False
        calls = [
            item
            for item in response.get("output") or []
            if isinstance(item, dict) and item.get("type") == "function_call"
        ]
        ours = [
            call
            for call in calls
            if call.get("name") not in self.client_names
            and (call.get("name") in self.catalogue or self.mcp.offer.runs(call.get("name")))
        ]
        # An MCP call that needs approval is the client's to answer too.
        return ours, len(ours) < len(calls)

    def held(self, event: Event) -> None:
        """An upstream event held back while a round's MCP calls run: the user
        speaking, or a response started upstream, takes the turn."""
        kind = event.get("type")
        if (
            kind in ("input_audio_buffer.speech_started", "response.created")
            and not self._follow_up
        ):
            self._stopped = True

    def wants(self, event: Event) -> bool:
        """Whether this upstream event starts a tool round (the drain waits for it)."""
        if event.get("type") != "response.done":
            return False
        ours, _ = self.server_calls(event)
        return bool(ours) and self.rounds < self.max_rounds

    def upstream(self, event: Event) -> None:
        """Follow an upstream event other than `response.done` (after the client got
        it): note what takes the turn from a running round."""
        kind = event.get("type")
        if kind == "response.created":
            self.mcp.opened(event)
            if self._follow_up:
                self._follow_up = False
            else:
                self.rounds = 0
                if self.busy:
                    self._stopped = True
        elif kind == "input_audio_buffer.speech_started" and self.busy:
            self._stopped = True

    def response_done(self, event: Event, text: str, *, run: bool) -> None:
        """Send the client an upstream `response.done` (`text`) and, when `run`, start
        the round of its server calls. A response with MCP calls has its
        `response.done` sent by the round, once they ran (the upstream's next
        events are held back meanwhile)."""
        response = event.get("response") or {}
        entries = self.mcp.calls_of(response)
        if self.mcp.closes(response):
            text = ""  # rewritten, with its calls' ends before it
        ours, client_runs = self.server_calls(event) if run else ([], False)
        if not ours:
            self.to_client(text or self.mcp.response_done(event, entries))
            return
        if self.rounds >= self.max_rounds:
            self.rounds = 0
            error = SwitchboardError(
                f"Stopped after {self.max_rounds} rounds of server-side tool calls in one turn.",
                code=common_pb2.ERROR_CODE_TOOL_ROUNDS_EXCEEDED,
            )
            self.to_client(text or self.mcp.response_done(event, entries))
            self.to_client(error_event(error))
            return
        self.rounds += 1
        self._stopped = client_runs
        if text:
            self.to_client(text)
        else:
            self.hold()
        self._task = asyncio.create_task(self._run(event, ours))

    async def _run(self, event: Event, calls: list[Event]) -> None:
        """Run one round's calls, answer them upstream, ask for the follow-up."""
        response = event.get("response") or {}
        response_id = str(response.get("id") or "")
        closes = self.mcp.closes(response)
        entries = self.mcp.calls_of(response)
        runs = [entry for entry in entries if not entry.approval]
        items = [
            common_pb2.Item(
                call_id=str(call.get("call_id") or ""),
                name=str(call.get("name") or ""),
                arguments=str(call.get("arguments") or ""),
            )
            for call in calls
            if not self.mcp.offer.owns(call.get("name"))
        ]
        attributes: dict[str, Any] = {
            **tracing.ids(self.server.tenant_id, self.server.session_id, response_id),
            "switchboard.tool_calls": len(items) + len(runs),
        }
        try:
            with tracing.span(_TRACER, "voice.tools", attributes=attributes):
                self.mcp.started(runs)
                results, given = await asyncio.gather(self.server.run(items), self.mcp.run(runs))
            self._answer(items, results)
            for entry, output in zip(runs, given, strict=True):
                answer = {
                    "type": "function_call_output",
                    "call_id": entry.call_id,
                    "output": output,
                }
                self.to_upstream(orjson.dumps({"type": "conversation.item.create", "item": answer}))
            if closes:
                self.to_client(self.mcp.response_done(event, entries))
        finally:
            if closes:
                self.release()
        if self._stopped:
            log.info(
                "voice tool round without follow-up",
                extra={"tenant_id": self.server.tenant_id, "session_id": self.server.session_id},
            )
            self.on_idle()
            return
        self._follow_up = True
        self.to_upstream(orjson.dumps({"type": "response.create"}))

    def _answer(
        self, items: list[common_pb2.Item], results: list[toolexec_pb2.ExecuteResponse]
    ) -> None:
        """Answer the toolexec calls upstream; a failed one is reported to the client."""
        for call, result in zip(items, results, strict=True):
            if result.outcome != toolexec_pb2.TOOL_OUTCOME_OK:
                self.to_client(error_event(_tool_error(call, result)))
            output = {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": result.output,
            }
            self.to_upstream(orjson.dumps({"type": "conversation.item.create", "item": output}))

    def close(self) -> None:
        """Stop a running round (the session ended)."""
        if self._task is not None:
            self._task.cancel()


def _tool_error(call: common_pb2.Item, result: toolexec_pb2.ExecuteResponse) -> SwitchboardError:
    """A failed call as the text path reports it (protocol.tool_output)."""
    return SwitchboardError(
        f"Tool '{call.name}' ({call.call_id}) failed: {result.error_message}",
        code=result.error_code or common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED,
        param=call.call_id,
    )
