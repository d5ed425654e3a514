"""What a voice session's next upstream session must be given: a pure core, no I/O.

`Carried` watches the events of one client voice session as they pass through
the broker (`observe` for the upstream's, `client_event` for the gateway's)
and keeps what a rollover (realtime_link.py) needs to open the same session on
a new upstream socket:

- the session as the upstream last reported it (`session.created`, then each
  `session.updated`), less the fields no client may set (`id`, `object`,
  `model`, `expires_at`, `client_secret`);
- the conversation's items in order, from `conversation.item.added/done`,
  `.deleted`, `.truncated` and `.input_audio_transcription.completed`, each
  with its id; audio bytes are never kept;
- whether the session is **between turns**: no response in progress
  (`response.created` .. `response.done`), no speech in progress
  (`input_audio_buffer.speech_started` .. `speech_stopped`/`committed`/
  `cleared`), and, when turn detection is off, no audio appended since the last
  commit or clear (the client's own turn, which a new session would lose).

`replay()` renders the items as `conversation.item.create` events that keep
their ids. What a new session cannot take as it was goes as text: a user's
`input_audio` part becomes `input_text` with its transcript (or
`UNTRANSCRIBED` when there is none), an assistant's `output_audio` part
becomes `output_text` with its transcript (empty once truncated); the ids of
those assistant items are `spoken_as_text`, because a later
`conversation.item.truncate` of them cannot be sent to the upstream as is.
Item types other than messages and function calls are not carried.
docs/voice.md#session-rollover states the same contract.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import orjson

# Fields of a session the upstream reports but a `session.update` may not set.
READ_ONLY: Final = frozenset({"id", "object", "model", "expires_at", "client_secret"})
# The text of user speech whose transcript the broker never saw.
UNTRANSCRIBED: Final = "[speech without a transcript]"
CARRIED_TYPES: Final = frozenset({"message", "function_call", "function_call_output"})

# The upstream events `observe` needs; any other type goes by untouched (and
# unparsed: audio deltas are most of the traffic).
_WATCHED: Final = (
    b'"session.',
    b'"conversation.item.',
    b'"response.created"',
    b'"response.done"',
    b'"input_audio_buffer.',
    b'"error"',
)


def watched(frame: bytes) -> bool:
    """Whether `frame` (an upstream event) may change what is carried."""
    head = frame[:160]
    return any(marker in head for marker in _WATCHED)


class Carried:
    """The session and conversation of one voice session, as the events showed them.

    Call `observe` with each upstream event (parsed) in order and `client_event`
    with the type of each client event sent upstream; read `idle`, `version`,
    `session_update()` and `replay()` at any time.
    """

    def __init__(self) -> None:
        self.session: dict[str, Any] = {}
        self.items: list[dict[str, Any]] = []
        self.spoken_as_text: set[str] = set()
        # Bumped on every change to the session or the items: a new session
        # prepared at one version is the same session only at that version.
        self.version = 0
        self._responses: set[str] = set()
        self._speaking = False
        self._uncommitted = False

    @property
    def idle(self) -> bool:
        """Between turns: nothing a new upstream session would lose or cut."""
        return not (self._responses or self._speaking or self._uncommitted)

    def _turn_detection(self) -> bool:
        audio = self.session.get("audio")
        inputs = audio.get("input") if isinstance(audio, dict) else None
        if not isinstance(inputs, dict):
            return True
        return inputs.get("turn_detection", True) is not None

    def client_event(self, kind: str) -> None:
        """A client event of type `kind` went upstream."""
        if kind == "input_audio_buffer.append" and not self._turn_detection():
            self._uncommitted = True
        elif kind in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
            self._uncommitted = False

    def observe(self, event: dict[str, Any]) -> None:
        """Take one upstream event into account."""
        kind = event.get("type")
        if kind in ("session.created", "session.updated"):
            session = event.get("session")
            if isinstance(session, dict):
                self.session = {k: v for k, v in session.items() if k not in READ_ONLY}
                self.version += 1
        elif kind in ("conversation.item.added", "conversation.item.done"):
            self._put(event)
        elif kind == "conversation.item.deleted":
            self._drop(str(event.get("item_id")))
        elif kind == "conversation.item.truncated":
            self._set_transcript(str(event.get("item_id")), event.get("content_index"), "")
        elif kind == "conversation.item.input_audio_transcription.completed":
            transcript = event.get("transcript")
            if isinstance(transcript, str):
                self._set_transcript(
                    str(event.get("item_id")), event.get("content_index"), transcript
                )
        elif kind == "response.created":
            self._responses.add(_response_id(event))
        elif kind == "response.done":
            self._responses.discard(_response_id(event))
        elif kind == "input_audio_buffer.speech_started":
            self._speaking = True
        elif kind in (
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "input_audio_buffer.cleared",
        ):
            self._speaking = False
            if kind != "input_audio_buffer.speech_stopped":
                self._uncommitted = False

    def _index(self, item_id: str) -> int | None:
        for index, item in enumerate(self.items):
            if item.get("id") == item_id:
                return index
        return None

    def _put(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return
        kept = _without_audio(item)
        self.version += 1
        found = self._index(kept["id"])
        if found is not None:
            self.items[found] = kept
            return
        previous = event.get("previous_item_id")
        if previous is None and "previous_item_id" in event:
            self.items.insert(0, kept)  # null: the conversation's first item
            return
        after = None if previous is None else self._index(str(previous))
        self.items.insert(len(self.items) if after is None else after + 1, kept)

    def _drop(self, item_id: str) -> None:
        found = self._index(item_id)
        if found is not None:
            del self.items[found]
            self.version += 1

    def _set_transcript(self, item_id: str, content_index: Any, transcript: str) -> None:
        found = self._index(item_id)
        if found is None:
            return
        parts = self.items[found].get("content")
        if not isinstance(parts, list):
            return
        index = content_index if isinstance(content_index, int) else 0
        if 0 <= index < len(parts) and isinstance(parts[index], dict):
            part = parts[index]
            if part.get("type") == "output_text" and item_id in self.spoken_as_text:
                part["text"] = transcript
            else:
                part["transcript"] = transcript
            self.version += 1

    def session_update(self) -> bytes:
        """The `session.update` that makes a new upstream session this one."""
        return orjson.dumps(
            {"type": "session.update", "session": {"type": "realtime", **self.session}}
        )

    def replay(self, event_id_prefix: str) -> tuple[list[bytes], set[str]]:
        """`conversation.item.create` of each carried item, in order, ids kept; and
        the ids of the assistant items that go as text (for `spoken_as_text`
        once the new session is the one in use)."""
        events = []
        spoken = set()
        for number, item in enumerate(self.items):
            carried = _as_created(item)
            if carried is None:
                continue
            if _spoken(item):
                spoken.add(str(item["id"]))
            event = {
                "type": "conversation.item.create",
                "event_id": f"{event_id_prefix}{number}",
                "item": carried,
            }
            events.append(orjson.dumps(event))
        return events, spoken

    def predecessor(self, item_id: str) -> str | None:
        """The id of the item before `item_id`, None when it is the first."""
        found = self._index(item_id)
        return str(self.items[found - 1]["id"]) if found else None


def _response_id(event: dict[str, Any]) -> str:
    response = event.get("response")
    return str(response.get("id")) if isinstance(response, dict) else ""


def _without_audio(item: dict[str, Any]) -> dict[str, Any]:
    """A copy of `item` without audio bytes (the broker never holds audio)."""
    kept = copy.deepcopy(item)
    parts = kept.get("content")
    if isinstance(parts, list):
        for part in parts:
            if isinstance(part, dict):
                part.pop("audio", None)
    return kept


def _spoken(item: dict[str, Any]) -> bool:
    parts = item.get("content")
    return item.get("role") == "assistant" and any(
        isinstance(part, dict) and part.get("type") == "output_audio"
        for part in (parts if isinstance(parts, list) else [])
    )


def _as_created(item: dict[str, Any]) -> dict[str, Any] | None:
    """`item` as a `conversation.item.create` can carry it, None if it cannot."""
    kind = item.get("type")
    if kind not in CARRIED_TYPES:
        return None
    if kind == "function_call":
        keys = ("id", "type", "call_id", "name", "arguments")
        return {key: item[key] for key in keys if key in item}
    if kind == "function_call_output":
        return {key: item[key] for key in ("id", "type", "call_id", "output") if key in item}
    parts = []
    for part in item.get("content") or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "input_audio":
            text = part.get("transcript")
            parts.append({"type": "input_text", "text": text if text else UNTRANSCRIBED})
        elif part.get("type") == "output_audio":
            parts.append({"type": "output_text", "text": part.get("transcript") or ""})
        else:
            parts.append(part)
    return {"id": item["id"], "type": "message", "role": item.get("role"), "content": parts}
