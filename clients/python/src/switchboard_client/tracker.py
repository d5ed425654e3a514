"""The client's protocol core, with no I/O: exactly-once delivery, where to
resume from, how each response went, and which client events the server has
not answered yet.

The driver (client.py) calls, in order: `accept` for every frame it reads,
`connection_lost` when a connection ends, and on a resumed connection with
events left unanswered, `sync_event` first and `unanswered` once `accept` has
seen the sync's answer (`synced`). A resume replays the session's log after
`last_event_id` before answering any client event, so when the sync's answer
arrives, every event the server recorded for an unanswered client event has
been delivered, and what is still unanswered never reached it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from switchboard_client.events import JSON, Response, ServerEvent, ToolCall

# Client event ids of the sync requests; their answers are not delivered.
SYNC_PREFIX = "sbc_sync_"
# The item id the sync retrieves (never an item: the answer is `item_not_found`).
SYNC_ITEM_ID = "sbc_sync_none"


@dataclass
class _OpenResponse:
    parts: list[str] = field(default_factory=list)
    # The connection was lost while it streamed.
    lost: bool = False


class EventTracker:
    """See the module docstring.

    Attributes:
        session_id: the session's id, from `session.created`.
        last_event_id: the id of the last event accepted (where a resume starts).
        duplicates: events dropped because they had been delivered already.
        losses: connections lost while a response streamed.
    """

    def __init__(self, *, remember: int = 50_000) -> None:
        self.session_id: str | None = None
        self.last_event_id: str | None = None
        self.duplicates = 0
        self.losses = 0
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._remember = remember
        self._open: dict[str, _OpenResponse] = {}
        self._unanswered: OrderedDict[str, JSON] = OrderedDict()
        self._sync_ids = (f"{SYNC_PREFIX}{n}" for n in itertools.count(1))
        self._sync_waiting: str | None = None

    # --- server events ------------------------------------------------------------------

    def accept(self, raw: JSON) -> ServerEvent | None:
        """The event to deliver for a frame, or None when it was delivered before
        (or answers the client's own sync)."""
        event_id = raw.get("event_id")
        event_id = event_id if isinstance(event_id, str) else ""
        if event_id:
            if event_id in self._seen:
                self.duplicates += 1
                return None
            self._remember_id(event_id)
            self.last_event_id = event_id
        kind = str(raw.get("type", ""))
        self._answered(kind, raw)
        if kind == "error" and _error_field(raw, "event_id").startswith(SYNC_PREFIX):
            if _error_field(raw, "event_id") == self._sync_waiting:
                self._sync_waiting = None
            return None
        response: Response | None = None
        if kind == "session.created":
            session = raw.get("session") or {}
            self.session_id = session.get("id") or self.session_id
        elif kind == "response.created":
            self._open[_response_id(raw)] = _OpenResponse()
        elif kind == "response.output_text.delta":
            open_ = self._open.get(str(raw.get("response_id", "")))
            if open_ is not None:
                open_.parts.append(str(raw.get("delta", "")))
        elif kind == "response.done":
            response = self._finish(raw)
        return ServerEvent(type=kind, event_id=event_id, data=raw, response=response)

    def connection_lost(self) -> None:
        """The connection ended: responses still streaming are resumed (or not)."""
        if self._open:
            self.losses += 1
        for open_ in self._open.values():
            open_.lost = True
        self._sync_waiting = None

    @property
    def streaming(self) -> bool:
        """True while a response has started and not ended."""
        return bool(self._open)

    def _finish(self, raw: JSON) -> Response:
        data: JSON = raw.get("response") or {}
        open_ = self._open.pop(str(data.get("id", "")), None) or _OpenResponse()
        status = str(data.get("status", ""))
        details = data.get("status_details") or {}
        error = details.get("error") or {}
        interrupted = (status == "failed" and error.get("code") == "response_interrupted") or (
            status == "cancelled" and details.get("reason") == "client_disconnected"
        )
        calls = tuple(
            ToolCall(str(item["call_id"]), str(item["name"]), str(item.get("arguments", "")))
            for item in data.get("output") or []
            if item.get("type") == "function_call"
        )
        return Response(
            id=str(data.get("id", "")),
            status=status,
            text="".join(open_.parts),
            tool_calls=calls,
            resumed=open_.lost and not interrupted,
            interrupted=interrupted,
            data=data,
        )

    def _remember_id(self, event_id: str) -> None:
        self._seen.add(event_id)
        self._seen_order.append(event_id)
        if len(self._seen_order) > self._remember:
            self._seen.discard(self._seen_order.popleft())

    # --- client events ------------------------------------------------------------------

    def sent(self, event: JSON) -> None:
        """Note a client event (with its `event_id`) as sent and not yet answered."""
        self._unanswered[str(event["event_id"])] = event

    def unanswered(self) -> list[JSON]:
        """The client events the server has not answered, in the order sent."""
        return list(self._unanswered.values())

    def sync_event(self) -> JSON:
        """A request whose answer marks the end of a resume's replay."""
        self._sync_waiting = next(self._sync_ids)
        return {
            "type": "conversation.item.retrieve",
            "event_id": self._sync_waiting,
            "item_id": SYNC_ITEM_ID,
        }

    @property
    def synced(self) -> bool:
        """True when no sync waits for its answer."""
        return self._sync_waiting is None

    def _answered(self, kind: str, raw: JSON) -> None:
        """Forget the client event a server event answers."""
        if kind == "error":
            self._unanswered.pop(_error_field(raw, "event_id"), None)
            return
        item_id = ""
        if kind in ("conversation.item.added", "conversation.item.retrieved"):
            item_id = str((raw.get("item") or {}).get("id", ""))
        elif kind == "conversation.item.deleted":
            item_id = str(raw.get("item_id", ""))
        answers = _ANSWERS.get(kind)
        for event_id, event in self._unanswered.items():
            if event["type"] in (answers or ()) and (
                not item_id or _item_id(event) in ("", item_id)
            ):
                del self._unanswered[event_id]
                return


# Which client event a server event answers (with the same item id, for items).
_ANSWERS: dict[str, tuple[str, ...]] = {
    "conversation.item.added": ("conversation.item.create",),
    "conversation.item.retrieved": ("conversation.item.retrieve",),
    "conversation.item.deleted": ("conversation.item.delete",),
    "session.updated": ("session.update",),
    "response.created": ("response.create",),
    "response.done": ("response.cancel",),
}


def _item_id(event: JSON) -> str:
    item = event.get("item")
    value: Any = item.get("id") if isinstance(item, dict) else event.get("item_id")
    return value if isinstance(value, str) else ""


def _response_id(raw: JSON) -> str:
    response = raw.get("response") or {}
    return str(response.get("id", ""))


def _error_field(raw: JSON, name: str) -> str:
    error = raw.get("error")
    value = error.get(name) if isinstance(error, dict) else None
    return value if isinstance(value, str) else ""
