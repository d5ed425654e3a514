"""What a held call produced so far, merged: the snapshot an Attach starts with.

A reply may run to a million tokens, so a `Transcript` keeps no events: it
keeps `Started` as it was sent and, per output in the order it first appeared
(the text, each tool call by its index), the text or the call's id, name and
argument fragments. `snapshot()` turns that back into events — `Started`, one
`TextDelta` with all the text, one `ToolCallDelta(index, call_id, name,
arguments)` per call — whose text and arguments equal the concatenation of
the deltas so far. `size` counts the UTF-8 bytes of text, ids, names and
arguments; `add` refuses (returns False) once they pass `max_bytes`, and the
holder then drops the transcript. `Finished` is not recorded: the holder
keeps the end of a call. Events are `events.Event`s: a text delta may be its
`str`. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from switchboard.broker.events import Event
from switchboard.v1 import broker_pb2


@dataclass(slots=True)
class _Output:
    """The text (`index` None) or one tool call, as fragments."""

    index: int | None
    call_id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)

    def event(self) -> broker_pb2.GenerateEvent:
        joined = "".join(self.parts)
        if self.index is None:
            return broker_pb2.GenerateEvent(text_delta=broker_pb2.TextDelta(text=joined))
        delta = broker_pb2.ToolCallDelta(
            index=self.index, call_id=self.call_id, name=self.name, arguments=joined
        )
        return broker_pb2.GenerateEvent(tool_call_delta=delta)


class Transcript:
    """The merged output of one call; see the module docstring."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._started: broker_pb2.GenerateEvent | None = None
        self._outputs: list[_Output] = []
        self._text: _Output | None = None
        self._calls: dict[int, _Output] = {}

    def add(self, event: Event) -> bool:
        """Record one event of the call; False once the transcript passed `max_bytes`."""
        if isinstance(event, str):
            return self.add_text(event)
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            return self.add_text(event.text_delta.text)
        if kind == "tool_call_delta":
            delta = event.tool_call_delta
            call = self._calls.get(delta.index)
            if call is None:
                call = self._calls[delta.index] = _Output(delta.index)
                self._outputs.append(call)
            if delta.call_id:
                call.call_id = delta.call_id
                self.size += len(delta.call_id.encode())
            if delta.name:
                call.name = delta.name
                self.size += len(delta.name.encode())
            if delta.arguments:
                call.parts.append(delta.arguments)
                self.size += len(delta.arguments.encode())
        elif kind == "started":
            self._started = event
        return self.size <= self.max_bytes

    def add_text(self, text: str) -> bool:
        """Record a text delta; False once the transcript passed `max_bytes`."""
        output = self._text
        if output is None:
            output = self._text = _Output(None)
            self._outputs.append(output)
        output.parts.append(text)
        # ASCII (the common case, and O(1) to tell) is one byte a character: no encoding.
        self.size += len(text) if text.isascii() else len(text.encode())
        return self.size <= self.max_bytes

    def snapshot(self) -> list[broker_pb2.GenerateEvent]:
        """`Started` (once sent), then one merged delta per output in order of appearance."""
        events = [] if self._started is None else [self._started]
        events += [output.event() for output in self._outputs]
        return events
