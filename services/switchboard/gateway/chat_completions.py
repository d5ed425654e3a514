"""`POST /v1/chat/completions` as pure functions: the request into a session and a
turn, and the turn's Realtime events back into Chat Completions chunks.

Nothing here does I/O. `parse_request` validates an OpenAI Chat Completions body
and returns a `TurnRequest` (the session's settings and the conversation items
the messages become); sse.py runs the turn on the same `TurnRunner` as the
Realtime path. `ChatTranslator` turns the turn's server events, as they are
recorded in the session's log, into chunks shaped exactly as OpenAI's; it is
fed from the first logged event, so a resumed stream (`Last-Event-ID`) rebuilds
the same chunks from the log. `fold` makes the non-streaming `chat.completion`
from the chunks.

The translator's call order: `feed(event)` for every logged event, oldest
first, each returning the frames it makes. The first event is the stream's
`switchboard.stream.opened` (sse.py), the last its `switchboard.stream.ended`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from switchboard.errors import (
    invalid_value,
    missing_parameter,
    quote,
    value_too_large,
)
from switchboard.gateway import bounds, fields
from switchboard.gateway.stream_format import (
    END_MARKER,
    Frame,
    StreamEnd,
    TurnRequest,
    check_temperature,
    end_of_turn,
    reject_params,
    text_content,
    unsupported,
)
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]
_C = common_pb2

# Parameters served as OpenAI serves them.
_SERVED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "n",
        "stop",
        "response_format",
        "user",
        "metadata",
        "store",
    }
)
# Parameters OpenAI knows that the broker cannot carry upstream: refused by name
# rather than silently dropped.
_NOT_SERVED = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "modalities",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "safety_identifier",
        "seed",
        "service_tier",
        "top_logprobs",
        "top_p",
        "verbosity",
        "web_search_options",
    }
)
_SYSTEM_ROLES = ("system", "developer")


def parse_request(body: dict[str, Any]) -> TurnRequest:
    """Validate a Chat Completions request body.

    Raises:
        InvalidRequest: naming the offending parameter as OpenAI does
            (`messages[2].content`); `unsupported_feature` for parameters and
            values Switchboard does not serve (`n` > 1, `stop`, JSON output).
    """
    reject_params(body, _SERVED, _NOT_SERVED)
    model = fields.model(body, "")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_value("stream", "Invalid type for 'stream': expected a boolean.")
    include_usage = _include_usage(body.get("stream_options"), bool(stream))
    max_tokens = 0
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            max_tokens = _positive(body[name], name)
    config = session_pb2.SessionConfig(
        model=model, max_output_tokens=max_tokens, tool_choice="auto"
    )
    temperature = body.get("temperature")
    if temperature is not None:
        config.temperature = check_temperature(temperature, "temperature")
    if body.get("tools") is not None:
        config.tools.extend(fields.function_tools(_flat_tools(body["tools"]), "tools"))
    if body.get("tool_choice") is not None:
        config.tool_choice = _tool_choice(body["tool_choice"])
    _check_served_values(body)
    items = _items(body.get("messages"))
    return TurnRequest(
        model=model,
        config=config,
        items=items,
        stream=bool(stream),
        include_usage=include_usage,
    )


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid_value(
            "stream_options", "Invalid type for 'stream_options': expected an object."
        )
    if not stream:
        raise invalid_value(
            "stream_options", "'stream_options' is only allowed when 'stream' is true."
        )
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid_value(
            "stream_options.include_usage",
            "Invalid type for 'stream_options.include_usage': expected a boolean.",
        )
    return include


def _positive(value: Any, param: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= fields.MAX_OUTPUT_TOKENS_LIMIT
    ):
        raise invalid_value(param, f"Invalid value for '{param}': expected a positive integer.")
    return value


def _flat_tools(value: Any) -> Any:
    """Chat Completions tools (`{"type": "function", "function": {...}}`) in the
    flat shape the Realtime validator reads; anything else is left for it to refuse."""
    if not isinstance(value, list):
        return value
    flat = []
    for raw in value:
        if isinstance(raw, dict) and raw.get("type", "function") == "function":
            function = raw.get("function")
            flat.append({"type": "function", **function} if isinstance(function, dict) else {})
        else:
            flat.append(raw)
    return flat


def _tool_choice(value: Any) -> str:
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return bounds.check_tool_name(function["name"], "tool_choice.function.name")
    if value in ("auto", "none", "required"):
        return str(value)
    raise invalid_value(
        "tool_choice",
        "Invalid value for 'tool_choice': expected 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}.",
    )


def _check_served_values(body: dict[str, Any]) -> None:
    """Parameters accepted only with the value Switchboard serves anyway."""
    n = body.get("n")
    if n is not None and n != 1:
        raise unsupported("n", "Only one choice per request is supported ('n' must be 1).")
    if body.get("stop") is not None:
        raise unsupported("stop", "'stop' sequences are not supported yet.")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise unsupported(
            "response_format", "Only {'type': 'text'} is supported as 'response_format'."
        )
    if body.get("parallel_tool_calls") not in (None, True):
        raise unsupported(
            "parallel_tool_calls", "'parallel_tool_calls' false is not supported yet."
        )
    metadata = body.get("metadata")
    if metadata is not None:
        bounds.metadata(metadata, "metadata")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_value("user", "Invalid type for 'user': expected a string.")


def _items(messages: Any) -> list[common_pb2.Item]:
    """The conversation items the `messages` become, in order."""
    if messages is None:
        raise missing_parameter("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_value("messages", "'messages' must be a non-empty array.")
    if len(messages) > bounds.MAX_INPUT_MESSAGES:
        raise value_too_large("messages", f"{bounds.MAX_INPUT_MESSAGES} messages")
    items: list[common_pb2.Item] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
        role = fields.require_str(message, "role", where)
        if role in _SYSTEM_ROLES or role == "user":
            text = text_content(message.get("content"), f"{where}.content", required=True)
            kind = _C.ROLE_USER if role == "user" else _C.ROLE_SYSTEM
            items.append(_message(kind, _C.CONTENT_TYPE_INPUT_TEXT, text))
        elif role == "assistant":
            items.extend(_assistant(message, where))
        elif role == "tool":
            items.append(
                _C.Item(
                    type=_C.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
                    status=_C.ITEM_STATUS_COMPLETED,
                    call_id=fields.require_id(message, "tool_call_id", where),
                    output=text_content(message.get("content"), f"{where}.content", required=True),
                )
            )
        else:
            raise invalid_value(
                f"{where}.role",
                f"Invalid value: {quote(role)}. Supported values are: 'system', 'developer', "
                "'user', 'assistant', and 'tool'.",
            )
    return items


def _message(
    role: common_pb2.Role.ValueType, part: common_pb2.ContentType.ValueType, text: str
) -> common_pb2.Item:
    return _C.Item(
        type=_C.ITEM_TYPE_MESSAGE,
        role=role,
        status=_C.ITEM_STATUS_COMPLETED,
        content=[_C.ContentPart(type=part, text=text)],
    )


def _assistant(message: dict[str, Any], where: str) -> list[common_pb2.Item]:
    """An assistant message: its text (if any), then its tool calls."""
    items = []
    text = text_content(message.get("content"), f"{where}.content", required=False)
    if text:
        items.append(_message(_C.ROLE_ASSISTANT, _C.CONTENT_TYPE_OUTPUT_TEXT, text))
    calls = message.get("tool_calls")
    if calls is None:
        calls = []
    if not isinstance(calls, list):
        raise invalid_value(f"{where}.tool_calls", "Invalid type: expected an array.")
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict):
            raise invalid_value(at, f"Invalid type for '{at}': expected an object.")
        function = call.get("function")
        if not isinstance(function, dict):
            raise missing_parameter(f"{at}.function")
        name = fields.require_str(function, "name", f"{at}.function")
        items.append(
            _C.Item(
                type=_C.ITEM_TYPE_FUNCTION_CALL,
                status=_C.ITEM_STATUS_COMPLETED,
                call_id=fields.require_id(call, "id", at),
                name=bounds.check_tool_name(name, f"{at}.function.name"),
                arguments=fields.optional_str(function, "arguments", f"{at}.function") or "{}",
            )
        )
    if not items:
        raise missing_parameter(f"{where}.content")
    return items


# --- the turn's events into chunks ---------------------------------------------------

_FINISH_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def usage_of(usage: Event) -> Event:
    """Chat Completions `usage` from the Realtime usage JSON (responses.usage_to_json)."""
    cached = usage.get("input_token_details", {}).get("cached_tokens", 0)
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@dataclass(slots=True)
class ChatTranslator:
    """A turn's logged events into `chat.completion.chunk`s (see the module docstring)."""

    chat_id: str = ""
    created: int = 0
    model: str = ""
    include_usage: bool = False
    client_tools: frozenset[str] = frozenset()
    end: StreamEnd = field(default_factory=StreamEnd)
    # Client tool calls of the turn's last response, by item id: their chunk index.
    _calls: dict[str, int] = field(default_factory=dict)
    _role_sent: bool = False

    def feed(self, event: Event) -> list[Frame]:
        kind = event.get("type")
        if kind == "switchboard.stream.opened":
            self.chat_id = "chatcmpl-" + event["stream_id"]
            self.created = event["created"]
            self.model = event["model"]
            self.include_usage = event["include_usage"]
            self.client_tools = frozenset(event["client_tools"])
            return []
        if kind == "response.created":
            self._calls = {}
            if self._role_sent:
                return []
            self._role_sent = True
            return [self._chunk({"role": "assistant", "content": "", "refusal": None})]
        if kind == "response.output_text.delta":
            self.end.committed = True
            return [self._chunk({"content": event["delta"]})]
        if kind == "response.output_item.added" and event["item"]["type"] == "function_call":
            item = event["item"]
            if item["name"] not in self.client_tools:
                return []  # a server-side tool: run by the gateway, never shown
            index = self._calls[item["id"]] = len(self._calls)
            self.end.committed = True
            call = {
                "index": index,
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if kind == "response.function_call_arguments.delta":
            known = self._calls.get(event["item_id"])
            if known is None:
                return []
            call = {"index": known, "function": {"arguments": event["delta"]}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "response.done":
            end_of_turn(self.end, event["response"])
            return []
        if kind == END_MARKER:
            return self._finish()
        return []

    def _chunk(self, delta: Event, finish_reason: str | None = None) -> Frame:
        return Frame(self._chunk_data(delta, finish_reason))

    def _chunk_data(self, delta: Event, finish_reason: str | None = None) -> Event:
        chunk: Event = {
            "id": self.chat_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _finish(self) -> list[Frame]:
        end = self.end
        if end.error is not None:
            return [Frame({"error": end.error})]
        if end.status == "completed":
            reason = "tool_calls" if self._calls else "stop"
        else:
            reason = _FINISH_REASONS.get(end.reason or "", "stop")
        frames = [self._chunk({}, reason)]
        if self.include_usage:
            chunk = self._chunk_data({})
            chunk["choices"] = []
            chunk["usage"] = usage_of(end.usage)
            frames.append(Frame(chunk))
        frames.append(Frame("[DONE]"))
        return frames


def fold(translator: ChatTranslator, frames: list[Frame]) -> Event:
    """The `chat.completion` of a non-streaming request, from its chunks."""
    text: list[str] = []
    calls: list[Event] = []
    finish_reason = "stop"
    for frame in frames:
        if not isinstance(frame.data, dict) or not frame.data.get("choices"):
            continue
        choice = frame.data["choices"][0]
        delta = choice["delta"]
        finish_reason = choice["finish_reason"] or finish_reason
        if delta.get("content"):
            text.append(delta["content"])
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                calls.append(
                    {"id": call["id"], "type": "function", "function": dict(call["function"])}
                )
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    message: Event = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": translator.chat_id,
        "object": "chat.completion",
        "created": translator.created,
        "model": translator.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": usage_of(translator.end.usage),
    }
