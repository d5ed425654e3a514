"""Ids of a connection's events, items and responses.

Event ids carry the event's place in the session's event log (its seq), so a
client's last event id says where a resume starts. The id of a text or
function-call arguments delta also carries its output offset: how many
characters of that output the client has once it has the delta
(`event_<prefix><seq>o<offset>`, both in hex). Deltas are sent before they are
recorded (sender.py), so a client may be ahead of the log; the offset says by
how much, and a resume serves the rest from the model call's transcript at the
broker (resume.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from itertools import count
from typing import NamedTuple

# An event id: "event_", the connection's 12-hex-digit prefix, its seq in hex,
# and for a delta "o" and its output offset in hex.
_EVENT_ID = re.compile(r"event_[0-9a-f]{12}([0-9a-f]{1,15})(?:o([0-9a-f]{1,15}))?")
# Where the seq starts in such an id.
_SEQ_AT = len("event_") + 12


class Ids:
    """Unique ids with a random per-connection prefix and a counter (cheap per event).

    A resumed connection goes on counting event seqs from `first_event_seq`.
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

    def delta_event(self, offset: int) -> str:
        """The id of a delta event after which the client has `offset` characters
        of the delta's output."""
        return f"event_{self._prefix}{next(self._event_seq):x}o{offset:x}"


class EventPosition(NamedTuple):
    """Where an event id of ours puts a client: its seq, and for a delta the
    output offset it has reached (None for any other event)."""

    seq: int
    offset: int | None


def event_position(event_id: str) -> EventPosition | None:
    """The position an event id of ours carries; None for anything else."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        return None
    offset = match.group(2)
    return EventPosition(int(match.group(1), 16), None if offset is None else int(offset, 16))


def event_seq(event_id: str) -> int | None:
    """The seq an event id of ours carries; None for anything else."""
    match = _EVENT_ID.fullmatch(event_id)
    return int(match.group(1), 16) if match else None


def made_event_seq(event_id: str) -> int:
    """The seq of an event id an `Ids` made (never a client's): `event_seq`
    without the pattern match, for the event log's hot path."""
    offset = event_id.find("o", _SEQ_AT)
    return int(event_id[_SEQ_AT:offset] if offset > 0 else event_id[_SEQ_AT:], 16)
