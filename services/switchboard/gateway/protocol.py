"""The OpenAI Realtime (GA) protocol of one connection, as a state machine with no I/O.

The protocol turns client frames into `Command`s for its driver and the
driver's reports into server events; it never waits and never fails on I/O.
Its state (`State`) says which reports it expects; a call made in another state
raises `InvalidState`, as python-websockets' protocol does, because it is a bug
in the driver.

Call order:

1. `open()` once (`open(resumed=True)` for a resumed session: no
   `session.created`). State NEW -> IDLE.
2. For every client frame, `receive_text()` / `receive_bytes()`: validates the
   event and returns the commands the driver must carry out. A bad event is
   queued as an `error` event and returns no command; the connection stays
   usable. `response.create` starts a response at once (IDLE -> RESPONDING) and
   returns its `StartResponse`; `response.cancel` returns `CancelResponse`.
3. When a command's I/O finishes, report it: `session_updated()`,
   `item_added()`, `item_deleted()`, `item_retrieved()`, or `fail()` with the
   error (any state).
4. While RESPONDING, the model's output: `text_delta()` and `call_delta()` per
   chunk; then `complete_output()` (returns the items to store) and
   `response_done()` (RESPONDING -> IDLE). `generated_chars()` sizes a usage
   estimate. After the response, `rate_limits_updated()` may follow.
5. A turn whose response ended in server-side function calls runs them:
   `tools_started()` (IDLE -> TOOLS; a client `response.create` is refused
   meanwhile), `tool_output()` per call (returns the output item to store,
   reported with `item_added()`), then `follow_up()` to start the next
   response of the turn (TOOLS -> RESPONDING) or `tools_ended()` (TOOLS -> IDLE).
6. A resumed session whose gateway died mid-response: `reopen()` takes the
   response up from its logged events (IDLE -> RESPONDING, then as in 4), or
   `interrupted()` ends it `failed` (IDLE).
7. After any call, `take_events()` returns the server events to send, in order.

Every server event gets an `event_id` that carries its seq in the session's
log; usage numbers are never null.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from switchboard.errors import InvalidRequest, SwitchboardError
from switchboard.gateway import client_events, fields, items, sessions
from switchboard.gateway.commands import (
    CancelResponse,
    Command,
    DeleteItem,
    RetrieveItem,
    StartResponse,
    StoreItem,
    UpdateSession,
)
from switchboard.gateway.ids import Ids
from switchboard.gateway.responses import UNSENT, ClientAhead, ResponseOutput, usage_to_json
from switchboard.tenancy import McpServer
from switchboard.v1 import broker_pb2, common_pb2, session_pb2, toolexec_pb2

Event = dict[str, Any]
_C = common_pb2

# How a model call's finish reason ends its response: (status, status reason).
_FINISH = {
    broker_pb2.FINISH_REASON_LENGTH: ("incomplete", "max_output_tokens"),
    broker_pb2.FINISH_REASON_CONTENT_FILTER: ("incomplete", "content_filter"),
}


def finish_status(reason: broker_pb2.FinishReason.ValueType) -> tuple[str, str | None]:
    """The `response.done` status and reason of a model call that finished."""
    return _FINISH.get(reason, ("completed", None))


class State(enum.Enum):
    NEW = "new"  # before open()
    IDLE = "idle"  # no response runs
    RESPONDING = "responding"  # a response streams
    TOOLS = "tools"  # between two responses of a turn: server-side tools run


class InvalidState(RuntimeError):
    """The driver reported something the protocol does not expect in its state."""


class RealtimeProtocol:
    """The Realtime protocol state of one connection. See the module docstring."""

    def __init__(
        self,
        *,
        session_id: str,
        config: session_pb2.SessionConfig,
        max_event_bytes: int,
        ids: Ids | None = None,
        session: Event | None = None,
        locked: frozenset[str] = frozenset(),
        first_event_seq: int = 1,
        mcp_servers: Mapping[str, McpServer] | None = None,
        admit_response: Callable[[], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.max_event_bytes = max_event_bytes
        self.ids = ids or Ids(first_event_seq=first_event_seq)
        self.conversation_id = "conv_" + session_id.removeprefix("sess_")
        self.session: Event = sessions.served_audio(
            session or sessions.initial_session(session_id, config)
        )
        # Session fields the client may not change (set by an ephemeral secret).
        self.locked = locked
        # The tenant's registered MCP servers: the only ones a client may name.
        self.mcp_servers: Mapping[str, McpServer] = mcp_servers or {}
        # Asked before a response.create is taken; raises `SwitchboardError` to
        # refuse it (load shedding: gateway/overload.py).
        self.admit_response = admit_response
        # Answers to MCP approval requests, stored and not yet acted on (the next
        # response runs or refuses the calls they answer).
        self.approvals: list[common_pb2.Item] = []
        self.state = State.NEW
        self.response: ResponseOutput | None = None
        self._events: list[Event] = []

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            wanted = " or ".join(state.value for state in states)
            raise InvalidState(f"the protocol is {self.state.value}, not {wanted}")

    # --- output ----------------------------------------------------------------------

    def take_events(self) -> list[Event]:
        """The server events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _emit(
        self,
        event_type: str,
        *,
        id_offset: int | None = None,
        recorded_as: str | None = None,
        **fields: Any,
    ) -> None:
        """Queue an event. `id_offset`: a delta's output offset, for its id.
        `recorded_as`: an event to record under that id, not to send (`UNSENT`)."""
        if recorded_as is not None:
            self._events.append({"type": event_type, "event_id": recorded_as, **fields, UNSENT: 1})
            return
        event_id = self.ids.new("event") if id_offset is None else self.ids.delta_event(id_offset)
        self._events.append({"type": event_type, "event_id": event_id, **fields})

    def fail(self, error: SwitchboardError, client_event_id: str | None = None) -> None:
        """Queue an `error` event for a failed client event or command."""
        self._emit("error", error=error.to_event_error(client_event_id))

    # --- input -----------------------------------------------------------------------

    def open(self, *, resumed: bool = False) -> None:
        """Start serving: `session.created`, unless the session is resumed."""
        self._expect(State.NEW)
        self.state = State.IDLE
        if not resumed:
            self._emit("session.created", session=self.session)

    def receive_bytes(self, data: bytes) -> list[Command]:
        self._expect(State.IDLE, State.RESPONDING, State.TOOLS)
        self.fail(
            InvalidRequest(
                "Binary frames are not supported: send each event as a JSON text frame.",
                code=_C.ERROR_CODE_BINARY_FRAME_UNSUPPORTED,
            )
        )
        return []

    def receive_text(self, text: str) -> list[Command]:
        """Handle one client text frame; returns the commands it asks for."""
        self._expect(State.IDLE, State.RESPONDING, State.TOOLS)
        client_event_id = None
        try:
            event = client_events.decode(text, self.max_event_bytes)
            raw_id = event.get("event_id")
            client_event_id = raw_id if isinstance(raw_id, str) else None
            kind = client_events.event_type(event)
            handler = self._handlers.get(kind)
            if handler is None:
                raise client_events.unknown_event(kind)
            return handler(self, event, client_event_id)
        except SwitchboardError as error:
            self.fail(error, client_event_id)
            return []

    # --- session and items -----------------------------------------------------------

    def _on_session_update(self, event: Event, client_event_id: str | None) -> list[Command]:
        session, config = sessions.apply_update(
            self.session,
            self.config,
            event.get("session"),
            locked=self.locked,
            mcp_servers=self.mcp_servers,
        )
        served = sessions.served_audio(session)
        return [UpdateSession(config=config, session=served, client_event_id=client_event_id)]

    def session_updated(self, command: UpdateSession) -> None:
        self.config = command.config
        self.session = command.session
        self._emit("session.updated", session=self.session)

    def _on_item_create(self, event: Event, client_event_id: str | None) -> list[Command]:
        item, previous = client_events.item_create(event)
        if not item.id:
            item.id = self.ids.new("item")
        return [StoreItem(item=item, previous_item_id=previous, client_event_id=client_event_id)]

    def item_added(self, item: common_pb2.Item, previous_item_id: str) -> None:
        """An item is stored: `conversation.item.added` then `.done`."""
        body = items.item_to_json(item)
        previous = previous_item_id or None
        self._emit("conversation.item.added", previous_item_id=previous, item=body)
        self._emit("conversation.item.done", previous_item_id=previous, item=body)
        if item.type == _C.ITEM_TYPE_MCP_APPROVAL_RESPONSE:
            self.approvals.append(item)

    def _on_item_delete(self, event: Event, client_event_id: str | None) -> list[Command]:
        item_id = fields.require_id(event, "item_id")
        return [DeleteItem(item_id=item_id, client_event_id=client_event_id)]

    def item_deleted(self, item_id: str) -> None:
        self._emit("conversation.item.deleted", item_id=item_id)

    def _on_item_retrieve(self, event: Event, client_event_id: str | None) -> list[Command]:
        item_id = fields.require_id(event, "item_id")
        return [RetrieveItem(item_id=item_id, client_event_id=client_event_id)]

    def item_retrieved(self, item: common_pb2.Item) -> None:
        self._emit("conversation.item.retrieved", item=items.item_to_json(item))

    def rate_limits_updated(self, rate_limits: list[Event]) -> None:
        self._emit("rate_limits.updated", rate_limits=rate_limits)

    # --- responses -------------------------------------------------------------------

    def _on_response_create(self, event: Event, client_event_id: str | None) -> list[Command]:
        raw = client_events.response_object(event)
        if self.state is not State.IDLE:
            active = self.response.id if self.response else "a tool round"
            raise InvalidRequest(
                f"Conversation already has an active response in progress: {active}. "
                "Wait until the response is finished before creating a new one.",
                code=_C.ERROR_CODE_CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE,
            )
        settings = client_events.response_settings(raw, self.config, self.mcp_servers)
        if self.admit_response is not None:
            self.admit_response()
        command = StartResponse(
            response_id=self.ids.new("resp"),
            model=self.config.model,
            instructions=settings.instructions,
            tools=settings.tools,
            tool_choice=settings.tool_choice,
            max_output_tokens=settings.max_output_tokens,
            metadata=settings.metadata,
            client_event_id=client_event_id,
            mcp_tools=settings.mcp_tools,
        )
        return [self._start(command)]

    def _start(self, command: StartResponse) -> StartResponse:
        self.state = State.RESPONDING
        self.response = ResponseOutput(
            command.response_id,
            emit=self._emit,
            new_id=self.ids.new,
            max_output_tokens=command.max_output_tokens,
            metadata=command.metadata,
        )
        self._emit("response.created", response=self._response_body(self.response, "in_progress"))
        return command

    def _on_response_cancel(self, event: Event, client_event_id: str | None) -> list[Command]:
        requested = fields.optional_id(event, "response_id")
        response = self.response
        if response is None or response.cancelling or (requested and requested != response.id):
            raise InvalidRequest(
                "Cancellation failed: no active response found.",
                code=_C.ERROR_CODE_RESPONSE_CANCEL_NOT_ACTIVE,
            )
        response.cancelling = True
        return [CancelResponse(response_id=response.id, client_event_id=client_event_id)]

    def _active(self, response_id: str) -> ResponseOutput:
        self._expect(State.RESPONDING)
        if self.response is None or self.response.id != response_id:
            raise InvalidState(f"response {response_id} is not the active response")
        return self.response

    def text_delta(self, response_id: str, delta: str) -> bool:
        """A chunk of the response's text. False when it was all a repeat of what
        was logged before a take-over (`reopen`), so nothing was queued."""
        return self._active(response_id).text_delta(delta)

    def call_delta(
        self, response_id: str, index: int, call_id: str, name: str, arguments: str
    ) -> bool:
        """A fragment of function call `index` (the first carries id and name).
        False when nothing was queued (a repeat, or an empty fragment)."""
        return self._active(response_id).call_delta(index, call_id, name, arguments)

    def generated_chars(self, response_id: str) -> int:
        return self._active(response_id).generated_chars

    def complete_output(self, response_id: str, *, complete: bool) -> list[common_pb2.Item]:
        """Close the response's output items; returns them for the driver to store.

        Args:
            complete: False when the response was cancelled or broke off, which
                marks its items `incomplete`.
        """
        return self._active(response_id).complete(complete=complete)

    def response_done(
        self,
        response_id: str,
        *,
        status: str,
        usage: common_pb2.Usage,
        reason: str | None = None,
        error: SwitchboardError | None = None,
    ) -> None:
        """Finish the response: `conversation.item.done` per item, then `response.done`.

        Args:
            status: completed, cancelled, incomplete or failed.
            reason: the `status_details.reason` (client_cancelled, max_output_tokens).
            error: for failed responses; also queued as an `error` event.
        """
        response = self._active(response_id)
        for body in response.done_items:
            self._emit("conversation.item.done", previous_item_id=None, item=body)
        if error is not None:
            self.fail(error)
        details: Event | None = None
        if status != "completed":
            details = {"type": status, "reason": reason}
            if error is not None:
                details["error"] = {
                    "type": error.spec.error_type,
                    "code": error.name,
                    "message": error.message,
                }
        body = self._response_body(response, status, details=details, usage=usage_to_json(usage))
        self.response = None
        self.state = State.IDLE
        self._emit("response.done", response=body)

    # --- MCP servers: their tool listings, and calls in the active response -----------

    def mcp_list_tools_started(self, item_id: str, server_label: str) -> None:
        """A server's tools are being listed: its `mcp_list_tools` item is added."""
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "mcp_list_tools",
            "server_label": server_label,
            "tools": [],
        }
        self._emit("conversation.item.added", previous_item_id=None, item=item)
        self._emit("mcp_list_tools.in_progress", item_id=item_id)

    def mcp_list_tools_completed(self, item: common_pb2.Item) -> None:
        """The listing is stored: `mcp_list_tools.completed`, then the item, done."""
        self._emit("mcp_list_tools.completed", item_id=item.id)
        self._emit("conversation.item.done", previous_item_id=None, item=items.item_to_json(item))

    def mcp_list_tools_failed(self, item_id: str, error: SwitchboardError) -> None:
        """The listing failed: `mcp_list_tools.failed` and an `error` event."""
        self._emit("mcp_list_tools.failed", item_id=item_id)
        self.fail(error)

    def mcp_output(self, response_id: str) -> ResponseOutput:
        """The active response's output, whose MCP items the turn drives
        (`mcp_names`, `open_mcp_call`, `pending_mcp_calls`, `mcp_call_started`,
        `mcp_call_finished`)."""
        return self._active(response_id)

    # --- server-side tools between the responses of a turn ----------------------------

    def tools_started(self) -> None:
        """The turn's last response ended in server-side calls, which run now."""
        self._expect(State.IDLE)
        self.state = State.TOOLS

    def tool_output(
        self, call: common_pb2.Item, result: toolexec_pb2.ExecuteResponse
    ) -> common_pb2.Item:
        """The `function_call_output` item of a server-side call, for the driver to
        store (then `item_added`). A failed call is also reported to the client; the
        model gets the error as the tool's output, to recover from it."""
        self._expect(State.TOOLS)
        if result.outcome != toolexec_pb2.TOOL_OUTCOME_OK:
            self.fail(
                SwitchboardError(
                    f"Tool '{call.name}' ({call.call_id}) failed: {result.error_message}",
                    code=result.error_code or _C.ERROR_CODE_TOOL_EXECUTION_FAILED,
                    param=call.call_id,
                )
            )
        return _C.Item(
            id=self.ids.new("item"),
            type=_C.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
            status=_C.ITEM_STATUS_COMPLETED,
            call_id=call.call_id,
            output=result.output,
        )

    def follow_up(self, previous: StartResponse) -> StartResponse:
        """Start the next response of the turn, with the settings of the previous one."""
        self._expect(State.TOOLS)
        return self._start(
            replace(previous, response_id=self.ids.new("resp"), client_event_id=None)
        )

    def tools_ended(self) -> None:
        """The turn ends after its tools (the client runs its own calls, the round
        limit was reached, or the turn was stopped)."""
        if self.state is State.TOOLS:
            self.state = State.IDLE

    # --- a response another gateway left unfinished -----------------------------------

    def reopen(self, logged: list[Event], ahead: ClientAhead | None = None) -> StartResponse:
        """Take over the response a killed gateway left streaming, from its logged
        events (`response.created` first): its output goes on where the log ends,
        or where the client's last delta ends (`ahead`: the client had deltas
        the log lacks; that text is recorded, not sent again).

        Returns:
            The command that runs the rest of its turn. Its model call is the one
            already running (the driver re-attaches to it); follow-up responses
            of a tool round use the session's tools.

        Raises:
            ValueError: the events are not those of a response left streaming.
        """
        self._expect(State.IDLE)
        if not logged or logged[0].get("type") != "response.created":
            raise ValueError("the log does not start with the response's response.created")
        body = logged[0]["response"]
        cap = body.get("max_output_tokens")
        response = ResponseOutput(
            body["id"],
            emit=self._emit,
            new_id=self.ids.new,
            max_output_tokens=cap if isinstance(cap, int) else 0,
            metadata=body.get("metadata"),
        )
        response.restore(logged[1:], ahead)
        self.response = response
        self.state = State.RESPONDING
        return StartResponse(
            response_id=response.id,
            model=self.config.model,
            instructions=None,
            tools=tuple(self.config.tools),
            tool_choice=self.config.tool_choice,
            max_output_tokens=response.max_output_tokens,
            metadata=response.metadata,
            client_event_id=None,
            mcp_tools=tuple(self.config.mcp_tools),
        )

    def interrupted(self, response_id: str) -> None:
        """End a response that another gateway started and never finished (it was
        killed), when its log cannot be taken up (`reopen`): `response.done` with
        status `failed` and `response_interrupted`. The text it streamed was sent
        and recorded; its output items were not stored, so later turns do not
        see them."""
        self._expect(State.IDLE)
        self.response = ResponseOutput(
            response_id, emit=self._emit, new_id=self.ids.new, max_output_tokens=0, metadata=None
        )
        self.state = State.RESPONDING
        error = SwitchboardError(
            "The gateway running this response stopped before the response ended; "
            "the text sent so far is all there is. Ask again with response.create.",
            code=_C.ERROR_CODE_RESPONSE_INTERRUPTED,
        )
        self.response_done(
            response_id, status="failed", usage=common_pb2.Usage(), reason=None, error=error
        )

    def _response_body(
        self,
        response: ResponseOutput,
        status: str,
        *,
        details: Event | None = None,
        usage: Event | None = None,
    ) -> Event:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": list(response.done_items),
            "conversation_id": self.conversation_id,
            "output_modalities": ["text"],
            "max_output_tokens": response.max_output_tokens or "inf",
            "audio": None,
            "usage": usage,
            "metadata": response.metadata,
        }

    _handlers: dict[str, Callable[[RealtimeProtocol, Event, str | None], list[Command]]] = {
        "session.update": _on_session_update,
        "conversation.item.create": _on_item_create,
        "conversation.item.delete": _on_item_delete,
        "conversation.item.retrieve": _on_item_retrieve,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
    }
