"""What the two OpenAI HTTP APIs the gateway serves over SSE (Chat Completions,
chat_completions.py; Responses, responses_api.py) share, as pure functions: the
turn a request asks for, the frames a translator makes, how a turn ended, and
the validation of fields both APIs have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter, quote
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]
_C = common_pb2

# The first and last events a stream logs, around its turn's Realtime events
# (Switchboard's own types, never sent as such to a client).
OPEN_MARKER = "switchboard.stream.opened"
END_MARKER = "switchboard.stream.ended"


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A validated request: a new session with these settings and items, and one turn."""

    model: str
    config: session_pb2.SessionConfig
    items: list[common_pb2.Item]
    stream: bool
    include_usage: bool = False
    # What the translator needs besides the events (the Responses API's echo of
    # the request's settings), logged in the stream's first event.
    echo: Event = field(default_factory=dict)


@dataclass(slots=True)
class Frame:
    """One SSE event for the client: its `data` (a JSON object, or a literal such
    as `[DONE]`) and its `event:` name (None for Chat Completions)."""

    data: Event | str
    event: str | None = None


def _zero_usage() -> Event:
    return {
        "total_tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "input_token_details": {"cached_tokens": 0},
    }


@dataclass(slots=True)
class StreamEnd:
    """How a stream's turn ended, from its `response.done` events."""

    # A delta reached the client: from here on, errors are sent in the stream
    # (before, the HTTP status says it).
    committed: bool = False
    status: str = "completed"
    reason: str | None = None
    # The OpenAI error object of a turn that did not end well.
    error: Event | None = None
    # The turn's usage so far, summed over its responses (Realtime usage JSON).
    usage: Event = field(default_factory=_zero_usage)


def end_of_turn(end: StreamEnd, response: Event) -> None:
    """Note a `response.done` of the turn (a turn with server-side tool rounds
    has several: the last one says how the turn ended)."""
    end.status = response["status"]
    details = response.get("status_details") or {}
    end.reason = details.get("reason")
    usage = response.get("usage") or {}
    for key in ("total_tokens", "input_tokens", "output_tokens"):
        end.usage[key] += usage.get(key, 0)
    cached = (usage.get("input_token_details") or {}).get("cached_tokens", 0)
    end.usage["input_token_details"]["cached_tokens"] += cached
    end.error = None
    if end.status == "failed":
        error = details.get("error") or {}
        end.error = {
            "message": error.get("message", "The response failed."),
            "type": error.get("type", "server_error"),
            "param": None,
            "code": error.get("code", "internal_error"),
        }
    elif end.status == "cancelled":
        end.error = {
            "message": f"The response was interrupted ({end.reason or 'cancelled'}).",
            "type": "server_error",
            "param": None,
            "code": "response_interrupted",
        }


def reject_params(body: Event, served: frozenset[str], not_served: frozenset[str]) -> None:
    """Refuse parameters this gateway does not serve, naming them."""
    for key in body:
        if key in served:
            continue
        if key in not_served:
            raise InvalidRequest(
                f"The parameter {quote(key)} is not supported by this gateway.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=key,
            )
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {quote(key)}.",
            code=_C.ERROR_CODE_UNKNOWN_PARAMETER,
            param=key[:64],
        )


def unsupported(param: str, message: str) -> InvalidRequest:
    """A valid OpenAI parameter or value this gateway does not serve."""
    return InvalidRequest(message, code=_C.ERROR_CODE_UNSUPPORTED_FEATURE, param=param)


def check_temperature(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise invalid_value(param, f"Invalid value for '{param}': expected a number from 0 to 2.")
    return float(value)


# Text parts of a message's content, by API: Chat Completions `text`, Responses
# `input_text` and `output_text`.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_UNSUPPORTED_PARTS = frozenset(
    {"image_url", "input_image", "input_audio", "input_file", "file", "refusal"}
)


def text_content(content: Any, param: str, *, required: bool) -> str:
    """A message's `content`: a string, or an array of text parts (joined).

    Raises:
        InvalidRequest: missing (when `required`), of another type, or with
            parts that are not text (`unsupported_feature`).
    """
    if content is None:
        if required:
            raise missing_parameter(param)
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_value(param, f"Invalid type for '{param}': expected a string or an array.")
    texts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
        kind = part.get("type")
        if kind in _UNSUPPORTED_PARTS:
            raise InvalidRequest(
                f"Content type {quote(kind)} is not supported: Switchboard serves text.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{where}.type",
            )
        if kind not in _TEXT_PARTS:
            raise invalid_value(f"{where}.type", f"Invalid value: {quote(kind)}.")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid_value(
                f"{where}.text", f"Invalid type for '{where}.text': expected a string."
            )
        texts.append(text)
    return "".join(texts)
