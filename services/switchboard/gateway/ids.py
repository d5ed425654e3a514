"""Ids of a connection's events, items and responses.

Event ids carry the event's place in the session's event log (its seq), so a
client's last event id says where a resume starts.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from itertools import count

# An event id: "event_", the connection's 12-hex-digit prefix, its seq in hex.
_EVENT_ID = re.compile(r"event_[0-9a-f]{12}([0-9a-f]{1,15})")


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


def event_seq(event_id: str) -> int | None:
    """The seq an event id of ours carries; None for anything else."""
    match = _EVENT_ID.fullmatch(event_id)
    return int(match.group(1), 16) if match else None
