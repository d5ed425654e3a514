"""The simulator's Realtime (GA) session as a state machine with no I/O.

`VoiceSession.receive(event)` takes one client event and returns a `Reply`:
the server events to send now, and maybe a `Plan`, the events of a response
to send on a schedule (the server's clock paces them; see realtime_ws.py).
Everything is deterministic: ids are counters (after a tag of the session's
id, so they are unique across sessions), the voice activity detection
is an energy threshold on 10 ms frames, what the simulator "hears" in a
stretch of speech is a transcript the test chose (a `[[sim {...}]]` directive
in the session's instructions) or `"<N> ms of speech"`, and reply audio is a
440 Hz tone whose length follows the reply's words. docs/simulator.md
documents the behaviour.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tools.simulator import audio, script

# OpenAI's defaults for a new session.
DEFAULT_VAD: Final[dict[str, Any]] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
SEMANTIC_SILENCE_MS: Final = {"low": 800, "medium": 500, "auto": 500, "high": 200}
CHUNK_MS: Final = 100
MS_PER_WORD: Final = 150
MIN_COMMIT_MS: Final = 100
# What VAD threshold 1.0 means as an RMS level (full scale 1): 0.5 -> about -32 dBFS.
LEVEL_AT_THRESHOLD_1: Final = 0.05
VOICE_KEYS: Final = frozenset(
    {
        "transcript",
        "tool_calls",
        "audio_ms",
        "ttfa_ms",
        "disconnect_after",
        "session_limit_s",
        "echo_context",
        "stamp_audio",
    }
)


@dataclass
class Step:
    """One event of a planned response, due `at_ms` after the response starts."""

    at_ms: int
    event: dict[str, Any]
    audio_ms: int = 0


@dataclass
class Plan:
    """A response's events on their schedule; `disconnect_after` cuts it (audio deltas)."""

    response_id: str
    steps: list[Step]
    disconnect_after: int | None = None
    # `stamp_audio`: each audio delta carries `sim_sent_at`, when it was sent.
    stamp_audio: bool = False


@dataclass
class Reply:
    """What one client event produced: events to send now, a response to start, a cancel."""

    events: list[dict[str, Any]] = field(default_factory=list)
    plan: Plan | None = None
    cancelled: bool = False


@dataclass
class _Response:
    id: str
    items: list[dict[str, Any]]
    usage: dict[str, Any]


def voice_directive(text: str) -> dict[str, Any]:
    """The voice keys of the `[[sim {...}]]` directives in `text` (others are ignored)."""
    try:
        _, found = script.split_directives(text)
    except script.RequestError:
        return {}
    return {key: value for key, value in found.items() if key in VOICE_KEYS}


class VoiceSession:
    """One simulated Realtime session.

    Call order: construct, send `created()`, then `receive()` each client event;
    when a plan's events have all been sent, `finished(response_id)`.
    """

    def __init__(self, session_id: str, model: str, *, ttfa_ms: int, chunk_delay_ms: int) -> None:
        self.session: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "include": None,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": dict(DEFAULT_VAD),
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "alloy",
                    "speed": 1.0,
                },
            },
        }
        self.ttfa_ms = ttfa_ms
        self.chunk_delay_ms = chunk_delay_ms
        self.items: list[dict[str, Any]] = []
        self._heard: dict[str, str] = {}
        self._audio_ms: dict[str, int] = {}
        self._counter = 0
        self._tag = session_id.removeprefix("sess_")[:8]
        self._users = 0
        self._transcripts_used = 0
        # Items an earlier response read: the prompt cache of the next one.
        self._cached_items = 0
        self.buffer = bytearray()
        self._written_ms = 0.0
        self._partial = b""
        self._speech_item: str | None = None
        self._speech_silence_ms = 0
        self.response: _Response | None = None

    # -- ids and shapes ------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        # The session's own tag keeps ids unique across sessions, as OpenAI's
        # are: a conversation carried to a new session keeps its items' ids.
        self._counter += 1
        return f"{prefix}_sim{self._tag}{self._counter:06d}"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self._id("event"), **fields}

    def error(
        self, code: str, message: str, param: str | None = None, event_id: Any = None
    ) -> dict[str, Any]:
        """An `error` event (the session goes on)."""
        body = {"type": "invalid_request_error", "code": code, "message": message}
        return self._event("error", error={**body, "param": param, "event_id": event_id})

    @property
    def directive(self) -> dict[str, Any]:
        """The voice directive of the session's instructions."""
        return voice_directive(str(self.session.get("instructions") or ""))

    def _input_format(self) -> str:
        return str(self.session["audio"]["input"]["format"].get("type", "audio/pcm"))

    def _output_format(self) -> str:
        return str(self.session["audio"]["output"]["format"].get("type", "audio/pcm"))

    # -- events --------------------------------------------------------------------

    def created(self) -> dict[str, Any]:
        """The `session.created` event that opens the session."""
        return self._event("session.created", session=copy.deepcopy(self.session))

    def receive(self, event: Mapping[str, Any]) -> Reply:
        """The server's answer to one client event."""
        kind = event.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return Reply([self.error("unknown_event", f"Unknown event type {kind!r}.", "type")])
        try:
            return handler(self, event)
        except _Refused as refused:
            return Reply(
                [self.error(refused.code, str(refused), refused.param, event.get("event_id"))]
            )

    def finished(self, response_id: str) -> None:
        """The plan of `response_id` has been sent in full."""
        if self.response is not None and self.response.id == response_id:
            self.response = None

    # -- session -------------------------------------------------------------------

    def _session_update(self, event: Mapping[str, Any]) -> Reply:
        update = event.get("session")
        if not isinstance(update, dict):
            raise _Refused("missing_required_parameter", "session is required", "session")
        for key, value in update.items():
            if key == "audio" and isinstance(value, dict):
                for side in ("input", "output"):
                    if isinstance(value.get(side), dict):
                        self.session["audio"][side].update(copy.deepcopy(value[side]))
                detection = self.session["audio"]["input"].get("turn_detection")
                if isinstance(detection, dict) and detection.get("type") == "server_vad":
                    self.session["audio"]["input"]["turn_detection"] = {**DEFAULT_VAD, **detection}
            elif key != "type":
                self.session[key] = copy.deepcopy(value)
        return Reply([self._event("session.updated", session=copy.deepcopy(self.session))])

    # -- input audio ---------------------------------------------------------------

    def _append(self, event: Mapping[str, Any]) -> Reply:
        raw = event.get("audio")
        if not isinstance(raw, str):
            raise _Refused("missing_required_parameter", "audio is required", "audio")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused("invalid_value", "audio is not valid base64", "audio") from None
        self.buffer += data
        reply = Reply()
        detection = self.session["audio"]["input"].get("turn_detection")
        fmt = self._input_format()
        chunk = self._partial + data
        frame_bytes = audio.bytes_per_ms(fmt) * audio.FRAME_MS
        whole = len(chunk) - len(chunk) % frame_bytes
        self._partial = chunk[whole:]
        if not isinstance(detection, dict):
            self._written_ms += audio.duration_ms(fmt, whole)
            return reply
        for level in audio.frame_levels(fmt, chunk[:whole]):
            self._written_ms += audio.FRAME_MS
            self._vad_frame(detection, level, reply)
        return reply

    def _vad_frame(self, detection: Mapping[str, Any], level: float, reply: Reply) -> None:
        threshold = float(detection.get("threshold", 0.5)) * LEVEL_AT_THRESHOLD_1
        now = int(self._written_ms)
        loud = level >= threshold
        if self._speech_item is None:
            if not loud:
                return
            self._speech_item = self._id("item")
            self._speech_silence_ms = 0
            start = max(0, now - audio.FRAME_MS - int(detection.get("prefix_padding_ms", 300)))
            speech = self._event(
                "input_audio_buffer.speech_started", audio_start_ms=start, item_id=self._speech_item
            )
            reply.events.append(speech)
            if self.response is not None and detection.get("interrupt_response", True):
                reply.events.extend(self._cancel("turn_detected"))
                reply.cancelled = True
            return
        if loud:
            self._speech_silence_ms = 0
            return
        self._speech_silence_ms += audio.FRAME_MS
        if detection.get("type") == "semantic_vad":
            silence = SEMANTIC_SILENCE_MS.get(str(detection.get("eagerness", "auto")), 500)
        else:
            silence = int(detection.get("silence_duration_ms", 200))
        if self._speech_silence_ms < silence:
            return
        item_id, self._speech_item = self._speech_item, None
        stopped = self._event(
            "input_audio_buffer.speech_stopped", audio_end_ms=now, item_id=item_id
        )
        reply.events.append(stopped)
        reply.events.extend(self._commit_buffer(item_id))
        if detection.get("create_response", True) and self.response is None:
            created = self._start_response({})
            reply.events.extend(created.events)
            reply.plan = created.plan

    def _commit(self, event: Mapping[str, Any]) -> Reply:
        ms = audio.duration_ms(self._input_format(), len(self.buffer))
        if ms < MIN_COMMIT_MS:
            raise _Refused(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS}ms of audio, "
                f"but buffer only has {ms:.2f}ms of audio",
            )
        item_id, self._speech_item = self._speech_item or self._id("item"), None
        return Reply(self._commit_buffer(item_id))

    def _clear(self, event: Mapping[str, Any]) -> Reply:
        self.buffer.clear()
        self._speech_item = None
        return Reply([self._event("input_audio_buffer.cleared")])

    def _heard_text(self, ms: int) -> str:
        wanted = self.directive.get("transcript")
        if isinstance(wanted, list) and wanted:
            text = wanted[min(self._transcripts_used, len(wanted) - 1)]
            self._transcripts_used += 1
            return str(text)
        if isinstance(wanted, str):
            return wanted
        return f"{ms} ms of speech"

    def _commit_buffer(self, item_id: str) -> list[dict[str, Any]]:
        ms = round(audio.duration_ms(self._input_format(), len(self.buffer)))
        self.buffer.clear()
        previous = self.items[-1]["id"] if self.items else None
        part: dict[str, Any] = {"type": "input_audio", "transcript": None}
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [part],
        }
        heard = self._heard_text(ms)
        self._heard[item_id], self._audio_ms[item_id] = heard, ms
        self.items.append(item)
        events = [
            self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
            self._event(
                "conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item)
            ),
            self._event(
                "conversation.item.done", previous_item_id=previous, item=copy.deepcopy(item)
            ),
        ]
        if self.session["audio"]["input"].get("transcription"):
            part["transcript"] = heard
            for word in script.tokenize(heard):
                events.append(
                    self._event(
                        "conversation.item.input_audio_transcription.delta",
                        item_id=item_id,
                        content_index=0,
                        delta=word,
                        logprobs=None,
                    )
                )
            tokens = max(1, math.ceil(ms / 100))
            words = len(script.tokenize(heard))
            events.append(
                self._event(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=item_id,
                    content_index=0,
                    transcript=heard,
                    usage={
                        "type": "tokens",
                        "input_tokens": tokens,
                        "output_tokens": words,
                        "total_tokens": tokens + words,
                        "input_token_details": {"text_tokens": 0, "audio_tokens": tokens},
                    },
                )
            )
        return events

    # -- conversation --------------------------------------------------------------

    def _item_create(self, event: Mapping[str, Any]) -> Reply:
        raw = event.get("item")
        if not isinstance(raw, dict) or raw.get("type") not in (
            "message",
            "function_call_output",
            "function_call",
        ):
            raise _Refused(
                "invalid_value", "item must be a message or a function call output", "item"
            )
        item = {"object": "realtime.item", "status": "completed", **copy.deepcopy(raw)}
        item.setdefault("id", self._id("item"))
        if item["type"] == "message" and item.get("role") == "user":
            self._heard[item["id"]] = " ".join(
                str(part.get("text", ""))
                for part in item.get("content", [])
                if isinstance(part, dict) and part.get("type") == "input_text"
            )
        after = event.get("previous_item_id")
        if after == "root":
            position = 0
        elif isinstance(after, str):
            position = self.items.index(self._find({"item_id": after})) + 1
        else:
            position = len(self.items)
        previous = self.items[position - 1]["id"] if position else None
        self.items.insert(position, item)
        return Reply(
            [
                self._event("conversation.item.added", previous_item_id=previous, item=item),
                self._event("conversation.item.done", previous_item_id=previous, item=item),
            ]
        )

    def _find(self, event: Mapping[str, Any]) -> dict[str, Any]:
        item_id = event.get("item_id")
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise _Refused("item_not_found", f"Item with item_id not found: {item_id}", "item_id")

    def _item_delete(self, event: Mapping[str, Any]) -> Reply:
        self.items.remove(self._find(event))
        return Reply([self._event("conversation.item.deleted", item_id=event["item_id"])])

    def _item_retrieve(self, event: Mapping[str, Any]) -> Reply:
        item = copy.deepcopy(self._find(event))
        return Reply([self._event("conversation.item.retrieved", item=item)])

    def _truncate(self, event: Mapping[str, Any]) -> Reply:
        item = self._find(event)
        end = event.get("audio_end_ms")
        length = self._audio_ms.get(item["id"])
        if item.get("role") != "assistant" or length is None:
            raise _Refused(
                "invalid_value", "Only assistant messages with audio can be truncated", "item_id"
            )
        if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= length:
            raise _Refused(
                "invalid_value",
                f"audio_end_ms {end} is out of range: the audio is {length} ms long",
                "audio_end_ms",
            )
        self._audio_ms[item["id"]] = end
        for part in item.get("content", []):
            part["transcript"] = ""
        index = event.get("content_index", 0)
        return Reply(
            [
                self._event(
                    "conversation.item.truncated",
                    item_id=item["id"],
                    content_index=index,
                    audio_end_ms=end,
                )
            ]
        )

    # -- responses -----------------------------------------------------------------

    def _response_create(self, event: Mapping[str, Any]) -> Reply:
        if self.response is not None:
            raise _Refused(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.response.id}.",
            )
        options = event.get("response")
        return self._start_response(options if isinstance(options, dict) else {})

    def _response_cancel(self, event: Mapping[str, Any]) -> Reply:
        if self.response is None:
            raise _Refused(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        return Reply(self._cancel("client_cancelled"), cancelled=True)

    def _cancel(self, reason: str) -> list[dict[str, Any]]:
        response = self.response
        assert response is not None
        self.response = None
        for item in response.items:
            item["status"] = "incomplete"
        body = self._response_body(response, "cancelled", {"type": "cancelled", "reason": reason})
        return [self._event("response.done", response=body)]

    def _output_clear(self, event: Mapping[str, Any]) -> Reply:
        response_id = self.response.id if self.response else None
        return Reply([self._event("output_audio_buffer.cleared", response_id=response_id)])

    def _response_body(
        self, response: _Response, status: str, details: dict[str, Any] | None
    ) -> dict[str, Any]:
        output = self.session["audio"]["output"]
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": copy.deepcopy(response.items),
            "conversation_id": "conv_" + str(self.session["id"]),
            "output_modalities": list(self.session["output_modalities"]),
            "max_output_tokens": "inf",
            "audio": {"output": {"format": output["format"], "voice": output["voice"]}},
            "usage": response.usage if status != "in_progress" else None,
            "metadata": None,
        }

    def _reply_text(self, merged: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """The words of the reply, or the function calls to make instead."""
        last = self.items[-1] if self.items else None
        if last is not None and last.get("type") == "function_call_output":
            name = next(
                (
                    i.get("name", "?")
                    for i in self.items
                    if i.get("call_id") == last.get("call_id") and i.get("type") == "function_call"
                ),
                "?",
            )
            return f"tool {name} returned {last.get('output', '')}", []
        if last is None or last.get("role") != "user":
            return f"turn {self._users}: nothing to answer.", []
        self._users = sum(1 for i in self.items if i.get("role") == "user")
        heard = self._heard.get(last["id"], "")
        said, found = script.split_directives(heard) if "[[sim" in heard else (heard, {})
        calls = found.get("tool_calls", merged.get("tool_calls"))
        if isinstance(calls, list) and calls:
            return "", calls
        text = f'turn {self._users}: you said "{said.strip()}".'
        if merged.get("echo_context") is True:
            text += " context=[" + ", ".join(self._recalled(self.items[:-1])) + "]"
        return text, []

    def _recalled(self, items: list[dict[str, Any]]) -> list[str]:
        """What the session holds of each of `items`, as `echo_context` names it."""
        names = []
        for item in items:
            if item.get("type") == "function_call":
                names.append(f"call {item.get('name', '?')}")
            elif item.get("type") == "function_call_output":
                names.append(f"output {item.get('output', '')}")
            elif item.get("role") == "user":
                names.append(f'user "{self._heard.get(item["id"], "")}"')
            else:
                said = "".join(
                    str(part.get("text") or part.get("transcript") or "")
                    for part in item.get("content", [])
                    if isinstance(part, dict)
                )
                names.append(f'{item.get("role", "?")} "{said}"')
        return names

    def _start_response(self, options: Mapping[str, Any]) -> Reply:
        directive = self.directive
        response = _Response(self._id("resp"), [], {})
        self.response = response
        modalities = options.get("output_modalities") or self.session["output_modalities"]
        text, calls = self._reply_text(directive)
        start = self._event(
            "response.created", response=self._response_body(response, "in_progress", None)
        )
        ttfa = int(directive.get("ttfa_ms", self.ttfa_ms))
        steps: list[Step] = []
        out_text = out_audio_ms = 0
        if calls:
            for index, call in enumerate(calls):
                out_text += self._plan_call(response, index, call, steps, ttfa)
        else:
            words = script.tokenize(text)
            out_text = len(words)
            audio_ms = "audio" in modalities
            total_ms = int(directive.get("audio_ms", MS_PER_WORD * len(words))) if audio_ms else 0
            out_audio_ms = total_ms
            self._plan_message(response, words, total_ms, steps, ttfa)
        response.usage = self._usage(out_text, out_audio_ms)
        body = self._response_body(response, "completed", None)
        steps.append(
            Step(steps[-1].at_ms if steps else ttfa, self._event("response.done", response=body))
        )
        disconnect = directive.get("disconnect_after")
        plan = Plan(
            response.id,
            steps,
            disconnect if isinstance(disconnect, int) else None,
            stamp_audio=directive.get("stamp_audio") is True,
        )
        return Reply([start], plan)

    def _plan_message(
        self, response: _Response, words: list[str], total_ms: int, steps: list[Step], ttfa: int
    ) -> None:
        spoken = total_ms > 0
        item_id = self._id("item")
        part_type = "output_audio" if spoken else "output_text"
        text = "".join(words)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": part_type, "transcript": text}
                if spoken
                else {"type": part_type, "text": text}
            ],
        }
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        response.items.append(item)
        if spoken:
            self._audio_ms[item_id] = total_ms
        where = {
            "response_id": response.id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
        }
        pending = {**item, "status": "in_progress", "content": []}
        part = {"type": "audio", "transcript": ""} if spoken else {"type": "text", "text": ""}
        at = 0
        steps.append(
            Step(
                at,
                self._event(
                    "response.output_item.added",
                    response_id=response.id,
                    output_index=0,
                    item=pending,
                ),
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "conversation.item.added",
                    previous_item_id=previous,
                    item=copy.deepcopy(pending),
                ),
            )
        )
        steps.append(Step(at, self._event("response.content_part.added", **where, part=part)))
        fmt = self._output_format()
        chunks = max(1, math.ceil(total_ms / CHUNK_MS)) if spoken else len(words)
        for index in range(chunks):
            at = ttfa + index * self.chunk_delay_ms
            for word in words[index * len(words) // chunks : (index + 1) * len(words) // chunks]:
                kind = (
                    "response.output_audio_transcript.delta"
                    if spoken
                    else "response.output_text.delta"
                )
                steps.append(Step(at, self._event(kind, **where, delta=word)))
            if spoken:
                ms = min(CHUNK_MS, total_ms - index * CHUNK_MS)
                data = base64.b64encode(audio.tone(fmt, ms, index * CHUNK_MS)).decode()
                steps.append(
                    Step(at, self._event("response.output_audio.delta", **where, delta=data), ms)
                )
        if spoken:
            steps.append(Step(at, self._event("response.output_audio.done", **where)))
            steps.append(
                Step(
                    at,
                    self._event("response.output_audio_transcript.done", **where, transcript=text),
                )
            )
            done_part = {"type": "audio", "transcript": text}
        else:
            steps.append(Step(at, self._event("response.output_text.done", **where, text=text)))
            done_part = {"type": "text", "text": text}
        steps.append(Step(at, self._event("response.content_part.done", **where, part=done_part)))
        steps.append(
            Step(
                at,
                self._event(
                    "response.output_item.done",
                    response_id=response.id,
                    output_index=0,
                    item=copy.deepcopy(item),
                ),
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "conversation.item.done", previous_item_id=previous, item=copy.deepcopy(item)
                ),
            )
        )

    def _plan_call(
        self, response: _Response, index: int, call: Any, steps: list[Step], ttfa: int
    ) -> int:
        spec = call if isinstance(call, dict) else {}
        arguments = spec.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = script.canonical_json(arguments).decode()
        item_id = self._id("item")
        # Unique across sessions, as OpenAI's are (toolexec keeps results by call id).
        call_id = str(spec.get("id") or f"call_{str(self.session['id'])[-8:]}{item_id[-6:]}")
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "completed",
            "name": str(spec.get("name", "tool")),
            "call_id": call_id,
            "arguments": arguments,
        }
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        response.items.append(item)
        at = ttfa + index * self.chunk_delay_ms
        pending = {**item, "status": "in_progress", "arguments": ""}
        where = {
            "response_id": response.id,
            "item_id": item_id,
            "output_index": index,
            "call_id": call_id,
        }
        steps.append(
            Step(
                at,
                self._event(
                    "response.output_item.added",
                    response_id=response.id,
                    output_index=index,
                    item=pending,
                ),
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "conversation.item.added",
                    previous_item_id=previous,
                    item=copy.deepcopy(pending),
                ),
            )
        )
        steps.append(
            Step(
                at, self._event("response.function_call_arguments.delta", **where, delta=arguments)
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=arguments,
                ),
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "response.output_item.done",
                    response_id=response.id,
                    output_index=index,
                    item=copy.deepcopy(item),
                ),
            )
        )
        steps.append(
            Step(
                at,
                self._event(
                    "conversation.item.done", previous_item_id=previous, item=copy.deepcopy(item)
                ),
            )
        )
        return max(1, math.ceil(len(arguments) / 4))

    def _usage(self, out_text: int, out_audio_ms: int) -> dict[str, Any]:
        """The response's usage. Its prompt cache: the items an earlier response of
        the session read (and the instructions) are cached input, text and audio."""
        chars = len(str(self.session.get("instructions") or ""))
        cached_chars = chars if self._cached_items else 0
        audio_tokens = cached_audio = 0
        for index, item in enumerate(self.items):
            cached = index < self._cached_items
            if item.get("role") == "user" and item["id"] in self._audio_ms:
                tokens = max(1, math.ceil(self._audio_ms[item["id"]] / 100))
                audio_tokens += tokens
                cached_audio += tokens if cached else 0
            else:
                size = len(script.canonical_json(item.get("content", item.get("arguments", ""))))
                chars += size
                cached_chars += size if cached else 0
        self._cached_items = len(self.items)
        text_in = max(1, math.ceil(chars / 4))
        cached_text = cached_chars // 4
        audio_out = math.ceil(out_audio_ms / 50)
        inputs, outputs = text_in + audio_tokens, out_text + audio_out
        return {
            "total_tokens": inputs + outputs,
            "input_tokens": inputs,
            "output_tokens": outputs,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_tokens,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": audio_out},
        }


class _Refused(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


_HANDLERS: Final = {
    "session.update": VoiceSession._session_update,
    "input_audio_buffer.append": VoiceSession._append,
    "input_audio_buffer.commit": VoiceSession._commit,
    "input_audio_buffer.clear": VoiceSession._clear,
    "output_audio_buffer.clear": VoiceSession._output_clear,
    "conversation.item.create": VoiceSession._item_create,
    "conversation.item.delete": VoiceSession._item_delete,
    "conversation.item.retrieve": VoiceSession._item_retrieve,
    "conversation.item.truncate": VoiceSession._truncate,
    "response.create": VoiceSession._response_create,
    "response.cancel": VoiceSession._response_cancel,
}
