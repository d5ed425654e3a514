"""Voice sessions' client events, validated, and the input audio bounds (pure, no I/O).

A voice session (docs/voice.md) forwards client events to the upstream
Realtime session through the broker; this module decides, for each one,
whether it may go: the event type is one the session serves, `session.update`
keeps within what Switchboard allows (GA `session.audio`, function tools,
fields an ephemeral secret locked), audio is base64 of whole samples, arrives
no faster than `MAX_AUDIO_RATE` times real time (after a burst) and never
fills the uncommitted buffer past `MAX_BUFFER_S`. Every refusal is an
`InvalidRequest` with a documented code (docs/errors.md); the session goes on.
"""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter, quote
from switchboard.gateway import bounds, fields, items, mcp_config
from switchboard.gateway.sessions import SESSION_FIELDS, check_locked
from switchboard.limits.ledger import AudioTokens
from switchboard.v1 import common_pb2

Event = dict[str, Any]
_C = common_pb2

# Client events a voice session forwards (after the checks below).
VOICE_EVENTS: Final = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "output_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.delete",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "response.create",
        "response.cancel",
    }
)
FORMATS: Final = ("audio/pcm", "audio/pcmu", "audio/pcma")
VOICES: Final = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
MAX_VOICE_ID_CHARS: Final = 128
MAX_TRANSCRIPTION_PROMPT_CHARS: Final = 4096
# Input audio may arrive at most this many times faster than real time on average,
# with this much audio allowed at once on top (a client catching up after a stall).
MAX_AUDIO_RATE: Final = 4.0
AUDIO_BURST_S: Final = 10.0
# Uncommitted input audio a session may hold (OpenAI's bound is 15 MiB, ~5 min of PCM16).
MAX_BUFFER_S: Final = 120.0

_INPUT_KEYS = frozenset({"format", "transcription", "noise_reduction", "turn_detection"})
_OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
_SERVER_VAD_KEYS = frozenset(
    {
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "idle_timeout_ms",
        "create_response",
        "interrupt_response",
    }
)
_SEMANTIC_VAD_KEYS = frozenset({"type", "eagerness", "create_response", "interrupt_response"})


def bytes_per_second(fmt: str) -> int:
    """Bytes of one second of mono audio in `fmt` (PCM16 at 24 kHz, G.711 at 8 kHz)."""
    return 48_000 if fmt == "audio/pcm" else 8_000


def audio_seconds(fmt: str, base64_chars: int) -> float:
    """Seconds of audio in a base64 string of this many characters (padding ignored)."""
    return base64_chars * 3 / 4 / bytes_per_second(fmt)


def _error(code: int, param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


@dataclass
class AudioInput:
    """The input audio of one voice session: format, uncommitted buffer, rate bucket.

    `append(audio, now)` checks one `input_audio_buffer.append`; `committed()`
    and `cleared()` empty the buffer (a commit by the client or by the
    upstream's voice activity detection).
    """

    format: str = "audio/pcm"
    buffered_s: float = 0.0
    total_s: float = 0.0
    _credit_s: float = AUDIO_BURST_S
    _at: float | None = field(default=None, repr=False)

    def append(self, audio: Any, now: float) -> float:
        """Seconds of audio in a valid chunk, counted in the buffer and the rate.

        Raises:
            InvalidRequest: `missing_required_parameter`, `invalid_audio`,
                `audio_rate_exceeded`, `input_audio_buffer_full`.
        """
        if audio is None:
            raise missing_parameter("audio")
        if not isinstance(audio, str):
            raise _error(_C.ERROR_CODE_INVALID_AUDIO, "audio", "'audio' must be a base64 string.")
        try:
            # Strict: only the base64 alphabet and proper padding (C, no regex pass).
            size = len(binascii.a2b_base64(audio, strict_mode=True))
        except (binascii.Error, ValueError):
            raise _error(
                _C.ERROR_CODE_INVALID_AUDIO, "audio", "'audio' is not valid base64."
            ) from None
        if self.format == "audio/pcm" and size % 2:
            raise _error(
                _C.ERROR_CODE_INVALID_AUDIO,
                "audio",
                "'audio' is not whole samples of audio/pcm (16-bit): an odd number of bytes.",
            )
        seconds = size / bytes_per_second(self.format)
        if self._at is not None:
            self._credit_s = min(AUDIO_BURST_S, self._credit_s + (now - self._at) * MAX_AUDIO_RATE)
        self._at = now
        if seconds > self._credit_s:
            raise _error(
                _C.ERROR_CODE_AUDIO_RATE_EXCEEDED,
                "audio",
                f"Input audio arrives faster than {MAX_AUDIO_RATE:g}x real time; "
                "this chunk was dropped.",
            )
        if self.buffered_s + seconds > MAX_BUFFER_S:
            raise _error(
                _C.ERROR_CODE_INPUT_AUDIO_BUFFER_FULL,
                "audio",
                f"The input audio buffer holds {MAX_BUFFER_S:g} s at most; commit or clear it.",
            )
        self._credit_s -= seconds
        self.buffered_s += seconds
        self.total_s += seconds
        return seconds

    def emptied(self) -> None:
        """The buffer was committed or cleared."""
        self.buffered_s = 0.0


def response_usage(raw: Any) -> tuple[common_pb2.Usage, AudioTokens]:
    """A Realtime `response.usage` as the ledger counts it: input (cached
    included), cached input, output and total tokens, and their audio share
    (`input_token_details.audio_tokens`,
    `input_token_details.cached_tokens_details.audio_tokens`,
    `output_token_details.audio_tokens`). Missing or bad counts are 0."""
    usage = raw if isinstance(raw, dict) else {}
    details_in = _mapping(usage.get("input_token_details"))
    details_out = _mapping(usage.get("output_token_details"))
    cached_details = _mapping(details_in.get("cached_tokens_details"))
    input_tokens, output_tokens = (
        _count(usage.get("input_tokens")),
        _count(usage.get("output_tokens")),
    )
    counted = common_pb2.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=_count(usage.get("total_tokens")) or input_tokens + output_tokens,
        cached_input_tokens=_count(details_in.get("cached_tokens")),
    )
    audio = AudioTokens(
        input=_count(details_in.get("audio_tokens")),
        cached_input=_count(cached_details.get("audio_tokens")),
        output=_count(details_out.get("audio_tokens")),
    )
    return counted, audio


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


_ITEM_TYPES = ("message", "function_call", "function_call_output", "mcp_approval_response")


def check_event(event: Event, kind: str, servers: mcp_config.Servers | None = None) -> None:
    """Refuse a voice session's client event that may not go upstream as sent
    (other than `session.update` and `input_audio_buffer.append`, checked apart).

    Raises:
        InvalidRequest: `unknown_event_type`, `invalid_value`, `value_too_large`, ...
    """
    if kind not in VOICE_EVENTS:
        raise InvalidRequest(
            f"Unknown event type '{kind[:64]}'.",
            code=_C.ERROR_CODE_UNKNOWN_EVENT_TYPE,
            param="type",
        )
    if kind in ("conversation.item.delete", "conversation.item.retrieve"):
        fields.require_id(event, "item_id")
    elif kind == "conversation.item.truncate":
        fields.require_id(event, "item_id")
        for name in ("content_index", "audio_end_ms"):
            if name not in event:
                raise missing_parameter(name)
            value = event[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid_value(name, f"Invalid value for '{name}': expected an integer >= 0.")
    elif kind == "conversation.item.create":
        item = event.get("item")
        if not isinstance(item, dict):
            raise (
                missing_parameter("item")
                if item is None
                else invalid_value("item", "Invalid type for 'item': expected an object.")
            )
        if item.get("type") not in _ITEM_TYPES:
            raise invalid_value(
                "item.type",
                f"Invalid value: {quote(item.get('type'))}. Expected 'message', "
                "'function_call', 'function_call_output' or 'mcp_approval_response'.",
            )
        if item["type"] == "mcp_approval_response":
            items.item_from_client(item)
    elif kind == "response.create":
        response = event.get("response") or {}
        if not isinstance(response, dict):
            raise invalid_value("response", "Invalid type for 'response': expected an object.")
        if "tools" in response:
            _tools(response["tools"], "response.tools", servers)
        if "instructions" in response:
            fields.instructions(response, "response")
        if "audio" in response:
            _output(
                response["audio"].get("output") if isinstance(response["audio"], dict) else None,
                "response.audio.output",
            )


def check_session(
    raw: Any, current: Event, locked: frozenset[str], servers: mcp_config.Servers | None = None
) -> str | None:
    """Check a voice session's `session.update` against the session it updates.

    Returns:
        The input audio format it sets, or None when it sets none.

    Raises:
        InvalidRequest: naming the field; `field_locked` for a field an ephemeral
            secret fixed, `invalid_value` for another model (a voice session
            keeps the model it opened with).
    """
    if raw is None:
        raise missing_parameter("session")
    if not isinstance(raw, dict):
        raise invalid_value("session", "Invalid type for 'session': expected an object.")
    fields.reject_unknown(raw, SESSION_FIELDS, "session")
    if raw.get("type", "realtime") != "realtime":
        raise invalid_value(
            "session.type", f"Invalid value: {quote(raw.get('type'))}. Expected 'realtime'."
        )
    check_locked(raw, current, locked)
    if "model" in raw and raw["model"] != current.get("model"):
        raise invalid_value(
            "session.model", "A voice session keeps its model; open a new session for another."
        )
    if "instructions" in raw:
        fields.instructions(raw, "session")
    if "tools" in raw:
        _tools(raw["tools"], "session.tools", servers)
    if "tool_choice" in raw:
        fields.tool_choice(raw["tool_choice"], "session.tool_choice")
    if "max_output_tokens" in raw:
        fields.max_output_tokens(raw["max_output_tokens"], "session")
    modalities = raw.get("output_modalities")
    if modalities is not None and modalities not in (["audio"], ["text"]):
        raise invalid_value(
            "session.output_modalities",
            "Invalid value for 'session.output_modalities': expected ['audio'] or ['text'].",
        )
    audio = raw.get("audio")
    if audio is None:
        return None
    if not isinstance(audio, dict):
        raise invalid_value(
            "session.audio", "Invalid type for 'session.audio': expected an object."
        )
    fields.reject_unknown(audio, frozenset({"input", "output"}), "session.audio")
    _output(audio.get("output"), "session.audio.output")
    return _input(audio.get("input"), "session.audio.input")


def _tools(value: Any, param: str, servers: mcp_config.Servers | None) -> None:
    """Function tools and `mcp` tools of servers the tenant registered (voice_mcp.py)."""
    mcp_config.split_tools(value, param, servers or {})


def _input(raw: Any, param: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid_value(param, f"Invalid type for '{param}': expected an object.")
    fields.reject_unknown(raw, _INPUT_KEYS, param)
    fmt = _format(raw.get("format"), f"{param}.format")
    if raw.get("transcription") is not None:
        _transcription(raw["transcription"], f"{param}.transcription")
    if raw.get("noise_reduction") is not None:
        _noise_reduction(raw["noise_reduction"], f"{param}.noise_reduction")
    if raw.get("turn_detection") is not None:
        _turn_detection(raw["turn_detection"], f"{param}.turn_detection")
    return fmt


def _output(raw: Any, param: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise invalid_value(param, f"Invalid type for '{param}': expected an object.")
    fields.reject_unknown(raw, _OUTPUT_KEYS, param)
    _format(raw.get("format"), f"{param}.format")
    voice = raw.get("voice")
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):
        bounds.check_chars(voice["id"], f"{param}.voice.id", MAX_VOICE_ID_CHARS)
    elif voice is not None and voice not in VOICES:
        raise invalid_value(
            f"{param}.voice", f"Invalid value: {quote(voice)}. Expected one of {', '.join(VOICES)}."
        )
    speed = raw.get("speed")
    if speed is not None and not (_number(speed) and 0.25 <= speed <= 1.5):
        raise invalid_value(f"{param}.speed", "Invalid value: expected a number from 0.25 to 1.5.")


def _format(raw: Any, param: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in FORMATS:
        raise invalid_value(
            param, f"Invalid value for '{param}': expected a type of {', '.join(FORMATS)}."
        )
    fields.reject_unknown(raw, frozenset({"type", "rate"}), param)
    rate = raw.get("rate")
    if raw["type"] == "audio/pcm" and rate not in (None, 24000):
        raise invalid_value(f"{param}.rate", "Invalid value: audio/pcm is 24000 Hz.")
    if raw["type"] != "audio/pcm" and rate not in (None, 8000):
        raise invalid_value(f"{param}.rate", f"Invalid value: {raw['type']} is 8000 Hz.")
    return str(raw["type"])


def _transcription(raw: Any, param: str) -> None:
    if not isinstance(raw, dict):
        raise invalid_value(param, f"Invalid type for '{param}': expected an object or null.")
    fields.reject_unknown(raw, frozenset({"model", "language", "prompt"}), param)
    for name, limit in (
        ("model", 128),
        ("language", 16),
        ("prompt", MAX_TRANSCRIPTION_PROMPT_CHARS),
    ):
        value = raw.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise invalid_value(f"{param}.{name}", "Invalid type: expected a string.")
            bounds.check_chars(value, f"{param}.{name}", limit)


def _noise_reduction(raw: Any, param: str) -> None:
    if not isinstance(raw, dict) or raw.get("type", "near_field") not in (
        "near_field",
        "far_field",
    ):
        raise invalid_value(param, "Invalid value: expected {'type': 'near_field' | 'far_field'}.")
    fields.reject_unknown(raw, frozenset({"type", "strength"}), param)
    strength = raw.get("strength")
    if strength is not None and not (_number(strength) and 0 <= strength <= 1):
        raise invalid_value(f"{param}.strength", "Invalid value: expected a number from 0 to 1.")


def _turn_detection(raw: Any, param: str) -> None:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("server_vad", "semantic_vad"):
        raise invalid_value(
            f"{param}.type", "Invalid value: expected 'server_vad', 'semantic_vad' or null."
        )
    fields.reject_unknown(
        raw, _SERVER_VAD_KEYS if kind == "server_vad" else _SEMANTIC_VAD_KEYS, param
    )
    for name in ("create_response", "interrupt_response"):
        if name in raw and not isinstance(raw[name], bool):
            raise invalid_value(f"{param}.{name}", "Invalid type: expected a boolean.")
    threshold = raw.get("threshold")
    if threshold is not None and not (_number(threshold) and 0 <= threshold <= 1):
        raise invalid_value(f"{param}.threshold", "Invalid value: expected a number from 0 to 1.")
    for name in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
        value = raw.get(name)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 60_000
        ):
            raise invalid_value(f"{param}.{name}", "Invalid value: expected milliseconds, 0-60000.")
    eagerness = raw.get("eagerness")
    if eagerness is not None and eagerness not in ("low", "medium", "high", "auto"):
        raise invalid_value(
            f"{param}.eagerness", "Invalid value: expected 'low', 'medium', 'high' or 'auto'."
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
