"""The form a model call's events take inside the broker, from the translator to the wire.

A text delta, the event of nearly every token, travels as its text: a plain
`str`, from `translate.ChunkTranslator.feed` through the call's pump, its
transcript and its follower to the message that carries it, where it becomes
a `TextDelta` once per batch (`multiplex.CallStream.collect`) or per gRPC
message (`as_event`, for Generate and Attach). Building a protobuf message per
token, and copying it into the next, cost more than the rest of the token's
way through the broker. Every other event (`Started`, `ToolCallDelta`,
`Finished`) is its `GenerateEvent`; a `GenerateEvent` holding a `TextDelta`
(an Attach snapshot's) is a text delta too.
"""

from __future__ import annotations

from typing import TypeAlias

from switchboard.v1 import broker_pb2

Event: TypeAlias = "str | broker_pb2.GenerateEvent"


def as_event(event: Event) -> broker_pb2.GenerateEvent:
    """The `GenerateEvent` of an event."""
    if isinstance(event, str):
        message = broker_pb2.GenerateEvent()
        message.text_delta.text = event
        return message
    return event


def text_of(event: Event) -> str | None:
    """The text of a text delta; None for any other event."""
    if isinstance(event, str):
        return event
    return event.text_delta.text if event.WhichOneof("event") == "text_delta" else None
