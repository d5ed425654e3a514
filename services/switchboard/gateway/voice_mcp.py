"""MCP tools in voice sessions (docs/voice.md#mcp-tools).

A voice client offers the tools of an MCP server its tenant registered with an
`{"type": "mcp"}` tool, as a text client does (mcp_config.py checks it). The
upstream never sees the server: the gateway lists its tools and declares each
upstream as a function `<label>__<tool>` in place of the `mcp` tool
(voice_mcp_offer.py), and turns the upstream's calls of those functions into
`mcp_call` items for the client:

- `response.output_item.added` / `conversation.item.added` of the call carry
  an `mcp_call` item; its `response.function_call_arguments.delta` become
  `response.mcp_call_arguments.delta`;
- the call's `response.function_call_arguments.done`, `response.output_item.done`
  and `conversation.item.done` are held back, with the response's
  `response.done`, until the call ran: then the client gets
  `response.mcp_call_arguments.done`, `response.mcp_call.in_progress`,
  `response.mcp_call.completed` (or `.failed`), the item's `.done` events with
  its `output` (or `error`), and the `response.done` whose output holds the
  `mcp_call` items, as a text client does;
- the answer the gateway gives the upstream (a `function_call_output`) is not
  shown: the result is in the `mcp_call` item.

The round itself (running, answering upstream, asking for the follow-up
response, the round limit, cancel and speech) is voice_tools.py's.

A call that needs the client's approval is shown as an `mcp_approval_request`
item instead, and not run. The client's `mcp_approval_response` stays here
(`approval_answer`); at its next `response.create` the approved calls run (the
denied ones are refused), are answered upstream (`answer_approvals`), and open
the response that follows as `mcp_call` items, the upstream's own output
moved after them (`opened`). Pure state and events but for `run` and
`answer_approvals`, which call toolexec.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from switchboard.errors import InvalidRequest
from switchboard.gateway import items
from switchboard.gateway.mcp_output import McpEntry, McpName, output_text, tool_error
from switchboard.gateway.mcp_session import NOT_APPROVED, execute
from switchboard.gateway.voice_mcp_offer import McpOffer
from switchboard.gateway.voice_outbox import local_event
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]
_C = common_pb2
_CALL_EVENTS = frozenset(
    {
        "response.output_item.added",
        "conversation.item.added",
        "response.output_item.done",
        "conversation.item.done",
    }
)


class VoiceMcp:
    """The MCP calls of one voice session (see the module), of the servers `offer`
    offers (its toolexec, ids and client are theirs)."""

    def __init__(self, offer: McpOffer) -> None:
        self.offer = offer
        self.backends = offer.backends
        self.tenant_id = offer.tenant_id
        self.session_id = offer.session_id
        self.new_id = offer.new_id
        self.to_client = offer.to_client
        self.names = offer.names
        # Calls of the responses in progress, by item id; what of them is held.
        self._calls: dict[str, McpEntry] = {}
        self._held: dict[str, dict[str, Event]] = {}
        # Call ids the gateway answered upstream: their outputs are not shown.
        self._answered: set[str] = set()
        # Approval requests by item id; those answered; the answers not acted on.
        self._requests: dict[str, McpEntry] = {}
        self._decided: set[str] = set()
        self._answers: list[common_pb2.Item] = []
        # Calls answered before the next response, and those that opened a
        # response (by its id): the upstream's output comes after them.
        self._opening: list[McpEntry] = []
        self._opened: dict[Any, list[McpEntry]] = {}

    # -- the upstream's events ----------------------------------------------------------

    def translate(self, event: Event) -> str | None:
        """An upstream event as the client sees it: None when it goes as it is, ""
        when it is held or hidden, else the rewritten event (JSON text)."""
        shifted = self._shift(event)
        translated = self._translate(event)
        if translated is None and shifted:
            return orjson.dumps(event).decode()
        return translated

    def _shift(self, event: Event) -> bool:
        """Move the upstream's output of a response that opened with approved (or
        denied) calls after them."""
        opened = self._opened.get(event.get("response_id")) if self._opened else None
        index = event.get("output_index")
        if opened is None or not isinstance(index, int):
            return False
        event["output_index"] = index + len(opened)
        return True

    def _translate(self, event: Event) -> str | None:
        kind = event.get("type")
        if kind in _CALL_EVENTS:
            item = event.get("item")
            if not isinstance(item, dict):
                return None
            if item.get("type") == "function_call_output":
                return "" if item.get("call_id") in self._answered else None
            if item.get("type") != "function_call":
                return None
            return self._call_item(event, kind, item)
        if kind == "response.function_call_arguments.delta":
            entry = self._calls.get(str(event.get("item_id")))
            if entry is None:
                return None
            delta = str(event.get("delta") or "")
            entry.arguments.append(delta)
            if entry.approval:
                return ""  # an approval request's arguments come whole, at its end
            event = {
                "type": "response.mcp_call_arguments.delta",
                "event_id": event.get("event_id"),
                "response_id": event.get("response_id"),
                "item_id": entry.item_id,
                "output_index": entry.output_index,
                "delta": delta,
            }
            return orjson.dumps(event).decode()
        if kind == "response.function_call_arguments.done":
            entry = self._calls.get(str(event.get("item_id")))
            if entry is None:
                return None
            entry.arguments[:] = [str(event.get("arguments") or "")]
            if not entry.approval:
                self._held[entry.item_id][kind] = event
            return ""
        return None

    def _call_item(self, event: Event, kind: Any, item: Event) -> str | None:
        item_id = str(item.get("id") or "")
        entry = self._calls.get(item_id)
        if entry is None:
            name = self.names.get(str(item.get("name") or ""))
            if name is None or kind != "response.output_item.added":
                return None
            index = event.get("output_index")
            entry = McpEntry(
                item_id,
                index if isinstance(index, int) else 0,
                str(item.get("call_id") or ""),
                name,
                approval=name.needs_approval,
            )
            self._calls[item_id] = entry
            self._held[item_id] = {}
        if kind.endswith(".done"):
            if entry.approval:  # not run: it ends with its arguments, at once
                return orjson.dumps({**event, "item": entry.body(final=True)}).decode()
            self._held[item_id][kind] = event
            return ""
        return orjson.dumps({**event, "item": entry.body(final=False)}).decode()

    def calls_of(self, response: Event) -> list[McpEntry]:
        """The MCP calls among a `response.done`'s output, in output order."""
        output = response.get("output") or []
        ids = [item.get("id") for item in output if isinstance(item, dict)]
        return [self._calls[i] for i in ids if isinstance(i, str) and i in self._calls]

    def closes(self, response: Event) -> bool:
        """Whether a `response.done` is to be rewritten (`response_done`)."""
        return bool(self.calls_of(response)) or response.get("id") in self._opened

    def started(self, entries: list[McpEntry]) -> None:
        """The calls run now: their arguments are whole, then `in_progress`."""
        for entry in entries:
            entry.started = True
            held = self._held[entry.item_id].pop("response.function_call_arguments.done", {})
            self.to_client(self._arguments_done(entry, held))
            self.to_client(
                local_event(
                    "response.mcp_call.in_progress",
                    after=held.get("event_id"),
                    item_id=entry.item_id,
                    output_index=entry.output_index,
                )
            )

    def _arguments_done(self, entry: McpEntry, held: Event) -> str:
        where = {"item_id": entry.item_id, "output_index": entry.output_index}
        body = {"response_id": held.get("response_id"), **where, "arguments": entry.text}
        if held:
            return orjson.dumps(
                {"type": "response.mcp_call_arguments.done", "event_id": held["event_id"], **body}
            ).decode()
        return local_event("response.mcp_call_arguments.done", **body)

    async def run(self, entries: list[McpEntry]) -> list[str]:
        """Run the calls in parallel through toolexec (never raises); each ends
        completed or failed. Returns what the model is given for each."""
        results = await execute(self.backends, self.tenant_id, self.session_id, entries)
        given = []
        for entry, result in zip(entries, results, strict=True):
            _record(entry, result)
            self._answered.add(entry.call_id)
            kind = "failed" if entry.error is not None else "completed"
            self.to_client(
                local_event(
                    f"response.mcp_call.{kind}",
                    item_id=entry.item_id,
                    output_index=entry.output_index,
                )
            )
            given.append(_given(entry))
        return given

    def response_done(self, event: Event, entries: list[McpEntry]) -> str:
        """Close the calls of a finished response (`.done` events with their result;
        arguments of calls that never ran end here) and its `response.done`, whose
        output holds them as `mcp_call` items."""
        response = event.get("response") or {}
        response_id = response.get("id")
        opened = self._opened.pop(response_id, [])
        for entry in opened:
            body = entry.body(final=True)
            where = {"response_id": response_id, "output_index": entry.output_index}
            self.to_client(local_event("response.output_item.done", **where, item=body))
            self.to_client(local_event("conversation.item.done", previous_item_id=None, item=body))
        for entry in entries:
            held = self._held.pop(entry.item_id, {})
            if entry.approval:
                self._requests[entry.item_id] = entry  # for the client's answer
            elif not entry.started:
                done = held.pop("response.function_call_arguments.done", {})
                self.to_client(self._arguments_done(entry, done))
            body = entry.body(final=True)
            for kind in ("response.output_item.done", "conversation.item.done"):
                if kind in held:
                    self.to_client(orjson.dumps({**held[kind], "item": body}).decode())
            self._calls.pop(entry.item_id, None)
        bodies = {entry.item_id: entry.body(final=True) for entry in entries}
        response["output"] = [entry.body(final=True) for entry in opened] + [
            bodies.get(str(item.get("id")), item) if isinstance(item, dict) else item
            for item in response.get("output") or []
        ]
        return orjson.dumps(event).decode()

    # -- approvals ----------------------------------------------------------------------

    def approval_answer(self, item: common_pb2.Item) -> None:
        """A client's `mcp_approval_response` (not sent upstream): added to the
        conversation as the client sees it, acted on at its next `response.create`.

        Raises:
            InvalidRequest: `item_not_found` when it answers no approval request of
                this connection (or one answered already).
        """
        request_id = item.approval_request_id
        if request_id not in self._requests or request_id in self._decided:
            raise InvalidRequest(
                f"The item '{request_id}' is not an mcp_approval_request.",
                code=_C.ERROR_CODE_ITEM_NOT_FOUND,
                param="item.approval_request_id",
            )
        self._decided.add(request_id)
        item.id = item.id or self.new_id()
        self._answers.append(item)
        body = items.item_to_json(item)
        self.to_client(local_event("conversation.item.added", previous_item_id=None, item=body))
        self.to_client(local_event("conversation.item.done", previous_item_id=None, item=body))

    async def answer_approvals(self) -> list[tuple[str, str]]:
        """Run the calls the client approved since the last response (refuse those it
        denied); they open the next response (`opened`).

        Returns:
            Each call's id and what the model is given for it.
        """
        answers, self._answers = self._answers, []
        entries = []
        for answer in answers:
            request = self._requests.pop(answer.approval_request_id)
            entry = McpEntry(
                self.new_id(),
                -1,
                request.call_id,
                McpName(request.name.server_label, request.name.tool, needs_approval=False),
                approval=False,
                arguments=[request.text],
                approval_request_id=answer.approval_request_id,
            )
            if not answer.approve:
                reason = f" Reason given: {answer.reason}" if answer.reason else ""
                entry.error = tool_error(NOT_APPROVED + reason)
            entries.append(entry)
        approved = [entry for entry in entries if entry.error is None]
        results = await execute(self.backends, self.tenant_id, self.session_id, approved)
        for entry, result in zip(approved, results, strict=True):
            entry.started = True
            _record(entry, result)
        self._opening.extend(entries)
        for entry in entries:
            self._answered.add(entry.call_id)
        return [(entry.call_id, _given(entry)) for entry in entries]

    def opened(self, event: Event) -> None:
        """A response started upstream: the calls answered before it open it, as in
        text sessions (its own output follows them)."""
        response_id = str((event.get("response") or {}).get("id") or "")
        if not self._opening or not response_id:
            return
        opened, self._opening = self._opening, []
        self._opened[response_id] = opened
        for index, entry in enumerate(opened):
            entry.output_index = index
            body = entry.body(final=False)
            where = {"item_id": entry.item_id, "output_index": index}
            self.to_client(
                local_event(
                    "response.output_item.added",
                    response_id=response_id,
                    output_index=index,
                    item=body,
                )
            )
            self.to_client(local_event("conversation.item.added", previous_item_id=None, item=body))
            if entry.started:
                self.to_client(
                    local_event(
                        "response.mcp_call_arguments.done",
                        response_id=response_id,
                        **where,
                        arguments=entry.text,
                    )
                )
                self.to_client(local_event("response.mcp_call.in_progress", **where))
            kind = "failed" if entry.error is not None else "completed"
            self.to_client(local_event(f"response.mcp_call.{kind}", **where))


def _record(entry: McpEntry, result: toolexec_pb2.ExecuteResponse) -> None:
    """A call's answer from toolexec, on its item."""
    if result.outcome == toolexec_pb2.TOOL_OUTCOME_OK:
        entry.output = output_text(result.output)
    else:
        entry.error = tool_error(result.error_message)


def _given(entry: McpEntry) -> str:
    """What the model is given for a call, as the text path gives it (broker/translate.py)."""
    if entry.output is not None:
        return entry.output
    return orjson.dumps({"error": entry.error}).decode()
