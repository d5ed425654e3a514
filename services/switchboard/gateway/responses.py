"""The output of one response as it streams: an assistant message and/or function calls.

`ResponseOutput` turns text and tool-call deltas into the Realtime GA events,
numbering output items in the order they first appear, and at the end closes
every open item and returns them for storing. It does no I/O; the protocol owns
one per active response and passes it its `emit` function.

A response whose gateway died mid-stream goes on elsewhere: `restore` takes up
the output that gateway logged (items keep their ids and places), and the
model call, re-attached at its broker, streams again from its beginning; the
deltas repeat what was logged up to its length, and only the rest is emitted.
A client can be ahead of the log (deltas are sent before they are recorded,
sender.py): its last delta's id says how much of the open output it has, and
that part of the output the log lacks (its *gap*) is recorded, not sent again,
under that id (`UNSENT`).

Delta events carry their output offset in their ids (ids.py): the characters
of that output the client has once it has the delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from switchboard.gateway import items
from switchboard.gateway.mcp_output import McpEntry, McpName
from switchboard.v1 import common_pb2

Event = dict[str, Any]
Emit = Callable[..., None]
_C = common_pb2

# The deltas a connection sends before it records them (sender.py): only those
# of the output opened last (`opened_output`), so that a client ahead of the log
# is ahead in one output only, by what its last delta's id says.
FAST_DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})
# A key of an event to record in the log but not send (a client's gap); the
# outbox drops it from what it serializes.
UNSENT = "_unsent"


def opened_output(event: Event) -> str | None:
    """The item id of the output an event opens (its item's or content part's
    `.added`), else None."""
    kind = event["type"]
    if kind == "response.output_item.added":
        return str(event["item"]["id"])
    if kind == "response.content_part.added":
        return str(event["item_id"])
    return None


@dataclass(frozen=True, slots=True)
class ClientAhead:
    """A resuming client ahead of the log: its last event, a delta of the output
    opened last, after which it had `offset` characters of that output."""

    event_id: str
    offset: int


@dataclass(slots=True)
class _Gap:
    """Output a client had that the log lacks: recorded under its last delta's id
    once all of it came by again."""

    event_id: str
    missing: int
    parts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Message:
    item_id: str
    output_index: int
    text: list[str] = field(default_factory=list)
    # Characters of text a re-attached stream repeats (restored from the log).
    repeated: int = 0
    # Characters of text so far (the offset in a delta's id).
    chars: int = 0
    gap: _Gap | None = None


@dataclass(slots=True)
class _Call:
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    # Characters of arguments a re-attached stream repeats (restored from the log).
    repeated: int = 0
    # Characters of arguments so far (the offset in a delta's id).
    chars: int = 0
    gap: _Gap | None = None


def _unrepeated(entry: _Message | _Call, delta: str) -> tuple[str, _Gap | None]:
    """What of `delta` the client has not had yet, and the client's gap once all
    of it came by; counts both off (a gap's text joins the entry's at once)."""
    if entry.repeated:
        skip = min(entry.repeated, len(delta))
        entry.repeated -= skip
        delta = delta[skip:]
    gap = entry.gap
    if gap is None or not delta:
        return delta, None
    part, delta = delta[: gap.missing], delta[gap.missing :]
    gap.parts.append(part)
    gap.missing -= len(part)
    entry.chars += len(part)
    (entry.text if isinstance(entry, _Message) else entry.arguments).append(part)
    if gap.missing:
        return delta, None
    entry.gap = None
    return delta, gap


class ResponseOutput:
    """Output items of one response. Call `complete()` once, after the last delta."""

    def __init__(
        self,
        response_id: str,
        *,
        emit: Emit,
        new_id: Callable[[str], str],
        max_output_tokens: int,
        metadata: Any,
    ) -> None:
        self.id = response_id
        self.max_output_tokens = max_output_tokens
        self.metadata = metadata
        self.cancelling = False
        self.done_items: list[Event] = []
        self._emit = emit
        self._new_id = new_id
        self._message: _Message | None = None
        self._calls: dict[int, _Call] = {}
        # Restored calls, by call id, until the re-attached stream names their index.
        self._restored_calls: dict[str, _Call] = {}
        self._count = 0
        # Function names that call MCP tools (offered by the turn), and the MCP
        # items of this response by tool-call index (negative: opened whole).
        self.mcp_names: dict[str, McpName] = {}
        self.mcp: dict[int, McpEntry] = {}

    @property
    def text(self) -> str:
        return "".join(self._message.text) if self._message else ""

    @property
    def generated_chars(self) -> int:
        """Characters generated so far (text and arguments), for usage estimates."""
        calls: list[_Call | McpEntry] = [
            *self._calls.values(),
            *self._restored_calls.values(),
            *self.mcp.values(),
        ]
        return len(self.text) + sum(sum(map(len, call.arguments)) for call in calls)

    def restore(self, logged: list[Event], ahead: ClientAhead | None = None) -> None:
        """Take up what another gateway streamed of this response: its logged
        events after `response.created`, oldest first; `ahead` when the client
        had more of the output opened last than the log has.

        Raises:
            ValueError: the events are not those of a response left streaming
                (or the client's offset is behind the log).
        """
        calls: dict[str, _Call] = {}  # by item id
        last_opened: str | None = None
        try:
            for event in logged:
                kind = event["type"]
                last_opened = opened_output(event) or last_opened
                if kind == "response.output_item.added":
                    item, index = event["item"], event["output_index"]
                    self._count = max(self._count, index + 1)
                    if item["type"] == "message":
                        self._message = _Message(item["id"], index)
                    else:
                        call = _Call(item["id"], index, item["call_id"], item["name"])
                        calls[call.item_id] = self._restored_calls[call.call_id] = call
                elif kind == "response.output_text.delta":
                    if self._message is None or self._message.item_id != event["item_id"]:
                        raise KeyError(event["item_id"])
                    self._message.text.append(event["delta"])
                elif kind == "response.function_call_arguments.delta":
                    calls[event["item_id"]].arguments.append(event["delta"])
                elif kind in ("response.output_item.done", "response.done"):
                    raise ValueError(f"the response was ending ({kind})")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a streaming response's events ({exc!r})") from None
        entries: list[_Message | _Call] = [*self._restored_calls.values()]
        if self._message is not None:
            entries.append(self._message)
        for entry in entries:
            parts = entry.text if isinstance(entry, _Message) else entry.arguments
            entry.repeated = entry.chars = sum(map(len, parts))
        if ahead is not None:
            self._restore_gap(entries, last_opened, ahead)

    @staticmethod
    def _restore_gap(
        entries: list[_Message | _Call], last_opened: str | None, ahead: ClientAhead
    ) -> None:
        open_entry = next((e for e in entries if e.item_id == last_opened), None)
        if open_entry is None:
            raise ValueError("the client's last delta is of no output the log opened")
        missing = ahead.offset - open_entry.chars
        if missing < 0:
            raise ValueError("the client's last delta is behind the log")
        if missing:
            open_entry.gap = _Gap(ahead.event_id, missing)

    def _open(self, item: Event) -> int:
        index, self._count = self._count, self._count + 1
        self._emit("response.output_item.added", response_id=self.id, output_index=index, item=item)
        self._emit("conversation.item.added", previous_item_id=None, item=item)
        return index

    def text_delta(self, delta: str) -> bool:
        """A chunk of assistant text; the first one opens the message item. False
        when it repeated only what was logged before a take-over."""
        message = self._message
        if message is not None and (message.repeated or message.gap):
            delta, gap = _unrepeated(message, delta)
            if gap is not None:
                self._emit(
                    "response.output_text.delta",
                    recorded_as=gap.event_id,
                    response_id=self.id,
                    item_id=message.item_id,
                    output_index=message.output_index,
                    content_index=0,
                    delta="".join(gap.parts),
                )
            if not delta:
                return False
        if message is None:
            item_id = self._new_id("item")
            index = self._open(
                {
                    "id": item_id,
                    "object": "realtime.item",
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
            )
            message = self._message = _Message(item_id, index)
            self._emit(
                "response.content_part.added",
                response_id=self.id,
                item_id=item_id,
                output_index=index,
                content_index=0,
                part={"type": "text", "text": ""},
            )
        message.text.append(delta)
        message.chars += len(delta)
        self._emit(
            "response.output_text.delta",
            id_offset=message.chars,
            response_id=self.id,
            item_id=message.item_id,
            output_index=message.output_index,
            content_index=0,
            delta=delta,
        )
        return True

    def call_delta(self, index: int, call_id: str, name: str, arguments: str) -> bool:
        """A fragment of function call `index`; the first one (with id and name) opens
        it. False when it added no arguments (empty, or a repeat of the log)."""
        if index in self.mcp or (index not in self._calls and name in self.mcp_names):
            return self._mcp_delta(index, call_id, name, arguments)
        call = self._calls.get(index)
        if call is None and call_id in self._restored_calls:
            call = self._calls[index] = self._restored_calls.pop(call_id)
        if call is None:
            item_id = self._new_id("item")
            output_index = self._open(
                {
                    "id": item_id,
                    "object": "realtime.item",
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": call_id,
                    "name": name,
                    "arguments": "",
                }
            )
            call = self._calls[index] = _Call(item_id, output_index, call_id, name)
        if call.repeated or call.gap:
            arguments, gap = _unrepeated(call, arguments)
            if gap is not None:
                self._emit(
                    "response.function_call_arguments.delta",
                    recorded_as=gap.event_id,
                    response_id=self.id,
                    item_id=call.item_id,
                    output_index=call.output_index,
                    call_id=call.call_id,
                    delta="".join(gap.parts),
                )
        if not arguments:
            return False
        call.arguments.append(arguments)
        call.chars += len(arguments)
        self._emit(
            "response.function_call_arguments.delta",
            id_offset=call.chars,
            response_id=self.id,
            item_id=call.item_id,
            output_index=call.output_index,
            call_id=call.call_id,
            delta=arguments,
        )
        return True

    def _mcp_delta(self, index: int, call_id: str, name: str, arguments: str) -> bool:
        entry = self.mcp.get(index)
        if entry is None:
            mcp = self.mcp_names[name]
            entry = McpEntry(self._new_id("item"), -1, call_id, mcp, approval=mcp.needs_approval)
            entry.output_index = self._open(entry.body(final=False))
            self.mcp[index] = entry
        if not arguments:
            return False
        entry.arguments.append(arguments)
        if not entry.approval:
            self._emit(
                "response.mcp_call_arguments.delta",
                response_id=self.id,
                item_id=entry.item_id,
                output_index=entry.output_index,
                delta=arguments,
            )
        return True

    def open_mcp_call(self, entry: McpEntry) -> None:
        """Open a call decided before the model spoke (approved or denied): its
        arguments are whole already."""
        entry.output_index = self._open(entry.body(final=False))
        self.mcp[-1 - len(self.mcp)] = entry

    def pending_mcp_calls(self) -> list[McpEntry]:
        """The `mcp_call`s to run (approval requests are not run), in output order."""
        pending = [e for e in self.mcp.values() if not e.approval and e.output is None]
        return sorted((e for e in pending if e.error is None), key=lambda e: e.output_index)

    def mcp_call_started(self, entry: McpEntry) -> None:
        entry.started = True
        where = {"item_id": entry.item_id, "output_index": entry.output_index}
        self._emit(
            "response.mcp_call_arguments.done", response_id=self.id, **where, arguments=entry.text
        )
        self._emit("response.mcp_call.in_progress", **where)

    def mcp_call_finished(self, entry: McpEntry, *, output: str | None, error: Any) -> None:
        """The call ran (`output`) or failed (`error`, an `mcp_call` error object)."""
        entry.output, entry.error = output, error
        kind = "failed" if error is not None else "completed"
        self._emit(
            f"response.mcp_call.{kind}", item_id=entry.item_id, output_index=entry.output_index
        )

    def complete(self, *, complete: bool) -> list[common_pb2.Item]:
        """Close every output item, in output order; returns them for storing.

        Args:
            complete: False when the response was cancelled or broke off, which
                marks its items `incomplete` (an incomplete call is never run).
        """
        status = _C.ITEM_STATUS_COMPLETED if complete else _C.ITEM_STATUS_INCOMPLETE
        entries: list[_Message | _Call | McpEntry] = [
            *self._calls.values(),
            *self._restored_calls.values(),
            *self.mcp.values(),
        ]
        if self._message is not None:
            entries.append(self._message)
        entries.sort(key=lambda entry: entry.output_index)
        closed = []
        # Each item's own `.done` events, then its `response.output_item.done`.
        for entry in entries:
            if isinstance(entry, _Message):
                item = self._close_message(status)
            elif isinstance(entry, McpEntry):
                item = self._close_mcp(entry, status)
            else:
                item = self._close_call(entry, status)
            body = (
                entry.body(final=True) if isinstance(entry, McpEntry) else items.item_to_json(item)
            )
            self._emit(
                "response.output_item.done",
                response_id=self.id,
                output_index=entry.output_index,
                item=body,
            )
            self.done_items.append(body)
            closed.append(item)
        return closed

    def _close_message(self, status: common_pb2.ItemStatus.ValueType) -> common_pb2.Item:
        assert self._message is not None
        message, text = self._message, self.text
        where: Event = {
            "response_id": self.id,
            "item_id": message.item_id,
            "output_index": message.output_index,
        }
        self._emit("response.output_text.done", **where, content_index=0, text=text)
        self._emit(
            "response.content_part.done",
            **where,
            content_index=0,
            part={"type": "text", "text": text},
        )
        return items.assistant_message(message.item_id, text, status=status, response_id=self.id)

    def _close_mcp(
        self, entry: McpEntry, status: common_pb2.ItemStatus.ValueType
    ) -> common_pb2.Item:
        if not entry.approval and not entry.started:
            # Never run (the response broke off first): its arguments end here.
            where = {"item_id": entry.item_id, "output_index": entry.output_index}
            self._emit(
                "response.mcp_call_arguments.done",
                response_id=self.id,
                **where,
                arguments=entry.text,
            )
        return entry.item(self.id, status)

    def _close_call(self, call: _Call, status: common_pb2.ItemStatus.ValueType) -> common_pb2.Item:
        arguments = "".join(call.arguments)
        self._emit(
            "response.function_call_arguments.done",
            response_id=self.id,
            item_id=call.item_id,
            output_index=call.output_index,
            call_id=call.call_id,
            name=call.name,
            arguments=arguments,
        )
        return _C.Item(
            id=call.item_id,
            type=_C.ITEM_TYPE_FUNCTION_CALL,
            status=status,
            call_id=call.call_id,
            name=call.name,
            arguments=arguments,
            response_id=self.id,
        )


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
