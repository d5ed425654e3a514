"""The output of one response as it streams: an assistant message and/or function calls.

`ResponseOutput` turns text and tool-call deltas into the Realtime GA events,
numbering output items in the order they first appear, and at the end closes
every open item and returns them for storing. It does no I/O; the protocol owns
one per active response and passes it its `emit` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from switchboard.gateway import items
from switchboard.v1 import common_pb2

Event = dict[str, Any]
Emit = Callable[..., None]
_C = common_pb2


@dataclass(slots=True)
class _Message:
    item_id: str
    output_index: int
    text: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)


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
        self._count = 0

    @property
    def text(self) -> str:
        return "".join(self._message.text) if self._message else ""

    @property
    def generated_chars(self) -> int:
        """Characters generated so far (text and arguments), for usage estimates."""
        return len(self.text) + sum(len("".join(c.arguments)) for c in self._calls.values())

    def _open(self, item: Event) -> int:
        index, self._count = self._count, self._count + 1
        self._emit("response.output_item.added", response_id=self.id, output_index=index, item=item)
        self._emit("conversation.item.added", previous_item_id=None, item=item)
        return index

    def text_delta(self, delta: str) -> None:
        """A chunk of assistant text; the first one opens the message item."""
        message = self._message
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
        self._emit(
            "response.output_text.delta",
            response_id=self.id,
            item_id=message.item_id,
            output_index=message.output_index,
            content_index=0,
            delta=delta,
        )

    def call_delta(self, index: int, call_id: str, name: str, arguments: str) -> None:
        """A fragment of function call `index`; the first one (with id and name) opens it."""
        call = self._calls.get(index)
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
        if not arguments:
            return
        call.arguments.append(arguments)
        self._emit(
            "response.function_call_arguments.delta",
            response_id=self.id,
            item_id=call.item_id,
            output_index=call.output_index,
            call_id=call.call_id,
            delta=arguments,
        )

    def complete(self, *, complete: bool) -> list[common_pb2.Item]:
        """Close every output item, in output order; returns them for storing.

        Args:
            complete: False when the response was cancelled or broke off, which
                marks its items `incomplete` (an incomplete call is never run).
        """
        status = _C.ITEM_STATUS_COMPLETED if complete else _C.ITEM_STATUS_INCOMPLETE
        entries: list[_Message | _Call] = list(self._calls.values())
        if self._message is not None:
            entries.append(self._message)
        entries.sort(key=lambda entry: entry.output_index)
        closed = []
        # Each item's own `.done` events, then its `response.output_item.done`.
        for entry in entries:
            if isinstance(entry, _Message):
                item = self._close_message(status)
            else:
                item = self._close_call(entry, status)
            body = items.item_to_json(item)
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
