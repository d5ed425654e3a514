"""The OpenAI Realtime (GA) protocol of one connection, as a state machine with no I/O.

Call order, in the manner of python-websockets' protocol module:

1. `open()` once: queues `session.created`.
2. For every client frame, `receive_text()` / `receive_bytes()`: validates the
   event and returns the `Command`s the driver must carry out (store an item,
   start a response, ...). Protocol errors are queued as `error` events and
   return no command; the connection stays usable.
3. When a command's I/O finishes, report it: `session_updated()`,
   `item_added()`, `item_deleted()`, `item_retrieved()`, or `fail()` with the
   error. A response is reported with `text_delta()` per chunk, then
   `complete_output()` (returns the items to store), then `response_done()`.
4. After any call, `take_events()` returns the server events to send, in order.

Every server event gets an `event_id`; usage numbers are never null.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import count
from typing import Any

import orjson

from switchboard.errors import InvalidRequest, SwitchboardError, invalid_value, missing_parameter
from switchboard.gateway import fields, items, sessions
from switchboard.gateway.responses import ResponseOutput
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]
_C = common_pb2

# Realtime events this gateway does not implement (audio, truncation): a client
# sending them gets `unsupported_feature`, not `unknown_event_type`.
_UNSUPPORTED_EVENTS = frozenset(
    {
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "output_audio_buffer.clear",
        "conversation.item.truncate",
        "transcription_session.update",
    }
)
_RESPONSE_FIELDS = frozenset(
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


# --- Commands: what the driver must do -------------------------------------------------


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
    """Run one model response. `instructions`/`tools` are None when not overridden."""

    response_id: str
    model: str
    instructions: str | None
    tools: tuple[common_pb2.ToolDefinition, ...]
    tool_choice: str
    max_output_tokens: int
    metadata: Any
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class CancelResponse:
    response_id: str
    client_event_id: str | None


Command = UpdateSession | StoreItem | DeleteItem | RetrieveItem | StartResponse | CancelResponse


# An event id: "event_", the connection's 12-hex-digit prefix, its seq in hex.
_EVENT_ID = re.compile(r"event_[0-9a-f]{12}([0-9a-f]{1,15})")


class Ids:
    """Unique ids with a random per-connection prefix and a counter (cheap per event).

    Event ids carry the event's place in the session's event log (its seq), so a
    client's last event id says where a resume starts; a resumed connection goes
    on counting from `first_event_seq`.
    """

    def __init__(
        self, token: Callable[[int], str] = secrets.token_hex, *, first_event_seq: int = 1
    ) -> None:
        self._prefix = token(6)
        self._counter = count(1)
        self._event_seq = count(first_event_seq)

    def new(self, kind: str) -> str:
        if kind == "event":
            return f"event_{self._prefix}{next(self._event_seq):x}"
        return f"{kind}_{self._prefix}{next(self._counter):x}"


def event_seq(event_id: str) -> int | None:
    """The seq an event id of ours carries; None for anything else."""
    match = _EVENT_ID.fullmatch(event_id)
    return int(match.group(1), 16) if match else None


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
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.max_event_bytes = max_event_bytes
        self.ids = ids or Ids(first_event_seq=first_event_seq)
        self.conversation_id = "conv_" + session_id.removeprefix("sess_")
        self.session: Event = session or sessions.initial_session(session_id, config)
        # Session fields the client may not change (set by an ephemeral secret).
        self.locked = locked
        self.response: ResponseOutput | None = None
        # True while the connection runs server-side tools between two responses
        # of one turn: the follow-up response is coming, a client one must wait.
        self.tools_running = False
        self._events: list[Event] = []

    # --- output ----------------------------------------------------------------------

    def take_events(self) -> list[Event]:
        """The server events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _emit(self, event_type: str, **fields: Any) -> None:
        self._events.append({"type": event_type, "event_id": self.ids.new("event"), **fields})

    def fail(self, error: SwitchboardError, client_event_id: str | None = None) -> None:
        """Queue an `error` event for a failed client event or command."""
        self._emit("error", error=error.to_event_error(client_event_id))

    # --- input -----------------------------------------------------------------------

    def open(self) -> None:
        self._emit("session.created", session=self.session)

    def receive_bytes(self, data: bytes) -> list[Command]:
        self.fail(
            InvalidRequest(
                "Binary frames are not supported: send each event as a JSON text frame.",
                code=_C.ERROR_CODE_BINARY_FRAME_UNSUPPORTED,
            )
        )
        return []

    def receive_text(self, text: str) -> list[Command]:
        """Handle one client text frame; returns the commands it asks for."""
        # A str is at most 4 bytes a character, so most frames need no encoding.
        if len(text) * 4 > self.max_event_bytes and len(text.encode()) > self.max_event_bytes:
            self.fail(
                InvalidRequest(
                    f"The event is larger than {self.max_event_bytes} bytes and was ignored.",
                    code=_C.ERROR_CODE_FRAME_TOO_LARGE,
                )
            )
            return []
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.fail(
                InvalidRequest(
                    f"The event is not valid JSON ({exc.msg} at position {exc.pos}).",
                    code=_C.ERROR_CODE_INVALID_JSON,
                )
            )
            return []
        client_event_id = None
        try:
            if not isinstance(event, dict):
                raise InvalidRequest(
                    "An event must be a JSON object.", code=_C.ERROR_CODE_INVALID_VALUE
                )
            raw_id = event.get("event_id")
            client_event_id = raw_id if isinstance(raw_id, str) else None
            return self._dispatch(event, client_event_id)
        except SwitchboardError as error:
            self.fail(error, client_event_id)
            return []

    def _dispatch(self, event: Event, client_event_id: str | None) -> list[Command]:
        event_type = event.get("type")
        if event_type is None:
            raise missing_parameter("type")
        if not isinstance(event_type, str):
            raise invalid_value("type", "Invalid type for 'type': expected a string.")
        handler = self._handlers.get(event_type)
        if handler is not None:
            return handler(self, event, client_event_id)
        if event_type in _UNSUPPORTED_EVENTS:
            raise InvalidRequest(
                f"'{event_type}' is not supported: Switchboard serves text conversations.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param="type",
            )
        raise InvalidRequest(
            f"Unknown event type '{event_type[:64]}'.",
            code=_C.ERROR_CODE_UNKNOWN_EVENT_TYPE,
            param="type",
        )

    # --- session.update --------------------------------------------------------------

    def _on_session_update(self, event: Event, client_event_id: str | None) -> list[Command]:
        session, config = sessions.apply_update(
            self.session, self.config, event.get("session"), locked=self.locked
        )
        return [UpdateSession(config=config, session=session, client_event_id=client_event_id)]

    def session_updated(self, command: UpdateSession) -> None:
        self.config = command.config
        self.session = command.session
        self._emit("session.updated", session=self.session)

    # --- conversation items ----------------------------------------------------------

    def _on_item_create(self, event: Event, client_event_id: str | None) -> list[Command]:
        item = items.item_from_client(event.get("item"))
        if not item.id:
            item.id = self.ids.new("item")
        previous = event.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise invalid_value(
                "previous_item_id", "Invalid type for 'previous_item_id': expected a string."
            )
        return [
            StoreItem(item=item, previous_item_id=previous or "", client_event_id=client_event_id)
        ]

    def item_added(self, item: common_pb2.Item, previous_item_id: str) -> None:
        """A client-created item is stored: `conversation.item.added` then `.done`."""
        body = items.item_to_json(item)
        previous = previous_item_id or None
        self._emit("conversation.item.added", previous_item_id=previous, item=body)
        self._emit("conversation.item.done", previous_item_id=previous, item=body)

    def _on_item_delete(self, event: Event, client_event_id: str | None) -> list[Command]:
        return [
            DeleteItem(
                item_id=fields.require_str(event, "item_id"), client_event_id=client_event_id
            )
        ]

    def rate_limits_updated(self, rate_limits: list[Event]) -> None:
        self._emit("rate_limits.updated", rate_limits=rate_limits)

    def item_deleted(self, item_id: str) -> None:
        self._emit("conversation.item.deleted", item_id=item_id)

    def _on_item_retrieve(self, event: Event, client_event_id: str | None) -> list[Command]:
        return [
            RetrieveItem(
                item_id=fields.require_str(event, "item_id"), client_event_id=client_event_id
            )
        ]

    def item_retrieved(self, item: common_pb2.Item) -> None:
        self._emit("conversation.item.retrieved", item=items.item_to_json(item))

    # --- responses -------------------------------------------------------------------

    def _on_response_create(self, event: Event, client_event_id: str | None) -> list[Command]:
        raw = event.get("response") or {}
        if not isinstance(raw, dict):
            raise invalid_value("response", "Invalid type for 'response': expected an object.")
        fields.reject_unknown(raw, _RESPONSE_FIELDS, "response")
        if self.response is not None or self.tools_running:
            active = self.response.id if self.response else "a tool round"
            raise InvalidRequest(
                f"Conversation already has an active response in progress: {active}. "
                "Wait until the response is finished before creating a new one.",
                code=_C.ERROR_CODE_CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE,
            )
        if raw.get("conversation", "auto") != "auto" or raw.get("input") is not None:
            raise InvalidRequest(
                "Out-of-band responses ('conversation': 'none' or 'input') are not supported yet.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param="response.conversation",
            )
        instructions = (
            fields.require_str(raw, "instructions", "response") if "instructions" in raw else None
        )
        max_tokens = (
            fields.max_output_tokens(raw["max_output_tokens"], "response")
            if "max_output_tokens" in raw
            else self.config.max_output_tokens
        )
        tools = (
            tuple(fields.function_tools(raw["tools"], "response.tools"))
            if "tools" in raw
            else tuple(self.config.tools)
        )
        tool_choice = (
            fields.tool_choice(raw["tool_choice"], "response.tool_choice")
            if "tool_choice" in raw
            else self.config.tool_choice
        )
        if "output_modalities" in raw:
            fields.output_modalities(raw["output_modalities"], "response")
        metadata = raw.get("metadata")
        return [
            self._start(
                StartResponse(
                    response_id=self.ids.new("resp"),
                    model=self.config.model,
                    instructions=instructions,
                    tools=tools,
                    tool_choice=tool_choice,
                    max_output_tokens=max_tokens,
                    metadata=metadata,
                    client_event_id=client_event_id,
                )
            )
        ]

    def _start(self, command: StartResponse) -> StartResponse:
        self.response = ResponseOutput(
            command.response_id,
            emit=self._emit,
            new_id=self.ids.new,
            max_output_tokens=command.max_output_tokens,
            metadata=command.metadata,
        )
        self._emit("response.created", response=self._response_body(self.response, "in_progress"))
        return command

    def follow_up(self, previous: StartResponse) -> StartResponse:
        """Start the next response of a tool loop, with the settings of the previous one."""
        if self.response is not None:
            raise RuntimeError("a response is still active")
        return self._start(
            replace(previous, response_id=self.ids.new("resp"), client_event_id=None)
        )

    def _on_response_cancel(self, event: Event, client_event_id: str | None) -> list[Command]:
        requested = event.get("response_id")
        response = self.response
        if response is None or response.cancelling or (requested and requested != response.id):
            raise InvalidRequest(
                "Cancellation failed: no active response found.",
                code=_C.ERROR_CODE_RESPONSE_CANCEL_NOT_ACTIVE,
            )
        response.cancelling = True
        return [CancelResponse(response_id=response.id, client_event_id=client_event_id)]

    def _active(self, response_id: str) -> ResponseOutput:
        if self.response is None or self.response.id != response_id:
            raise RuntimeError(f"response {response_id} is not active")
        return self.response

    def text_delta(self, response_id: str, delta: str) -> None:
        self._active(response_id).text_delta(delta)

    def call_delta(
        self, response_id: str, index: int, call_id: str, name: str, arguments: str
    ) -> None:
        self._active(response_id).call_delta(index, call_id, name, arguments)

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
        self._emit("response.done", response=body)

    def reopen(self, logged: list[Event]) -> StartResponse:
        """Take over the response a killed gateway left streaming, from its logged
        events (`response.created` first): its output goes on where the log ends.

        Returns:
            The command that runs the rest of its turn. Its model call is the one
            already running (the driver re-attaches to it); follow-up responses
            of a tool round use the session's tools.

        Raises:
            ValueError: the events are not those of a response left streaming.
        """
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
        response.restore(logged[1:])
        self.response = response
        return StartResponse(
            response_id=response.id,
            model=self.config.model,
            instructions=None,
            tools=tuple(self.config.tools),
            tool_choice=self.config.tool_choice,
            max_output_tokens=response.max_output_tokens,
            metadata=response.metadata,
            client_event_id=None,
        )

    def interrupted(self, response_id: str) -> None:
        """End a response that another gateway started and never finished (it was
        killed), when its log cannot be taken up (`reopen`): `response.done` with
        status `failed` and `response_interrupted`. The text it streamed was sent
        and recorded; its output items were not stored, so later turns do not
        see them."""
        self.response = ResponseOutput(
            response_id, emit=self._emit, new_id=self.ids.new, max_output_tokens=0, metadata=None
        )
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


def usage_to_json(usage: common_pb2.Usage) -> Event:
    """The Realtime `usage` object; every count is a number, never null."""
    cached = int(usage.cached_input_tokens)
    return {
        "total_tokens": int(usage.total_tokens or usage.input_tokens + usage.output_tokens),
        "input_tokens": int(usage.input_tokens),
        "output_tokens": int(usage.output_tokens),
        "input_token_details": {
            "text_tokens": int(usage.input_tokens),
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": int(usage.output_tokens), "audio_tokens": 0},
    }


def estimate_usage(input_tokens: int, generated_chars: int) -> common_pb2.Usage:
    """Usage when the upstream reported none (a cancelled or broken stream)."""
    output_tokens = math.ceil(generated_chars / 4)
    return common_pb2.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        estimated=True,
    )
