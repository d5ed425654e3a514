"""`POST /v1/responses` as pure functions: the request into a session and a turn,
and the turn's Realtime events back into the Responses API's semantic events.

As chat_completions.py does for Chat Completions: `parse_request` validates
the body into a `TurnRequest`; `ResponsesTranslator` turns the turn's logged
events, from the first (`switchboard.stream.opened`) to the last
(`switchboard.stream.ended`), into `response.created`,
`response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` / `.done`,
`response.function_call_arguments.delta` / `.done`,
`response.content_part.done`, `response.output_item.done`, and at the end
`response.completed`, `response.incomplete` or `response.failed`, numbered by
`sequence_number`. `fold` is the non-streaming answer: the final response.

Calls to the tenant's server-side tools (toolexec) run in the gateway and are
not shown; their items are left out and the output indexes of the rest stay
contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from switchboard.errors import invalid_value, missing_parameter, quote, value_too_large
from switchboard.gateway import bounds, fields
from switchboard.gateway.stream_format import (
    END_MARKER,
    OPEN_MARKER,
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

_SERVED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "max_output_tokens",
        "temperature",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "truncation",
        "metadata",
        "store",
        "user",
        "stream_options",
        "previous_response_id",
        "reasoning",
        "background",
    }
)
_NOT_SERVED = frozenset(
    {
        "conversation",
        "include",
        "max_tool_calls",
        "prompt",
        "prompt_cache_key",
        "safety_identifier",
        "service_tier",
        "top_logprobs",
        "top_p",
    }
)
_ROLES = {
    "user": (_C.ROLE_USER, _C.CONTENT_TYPE_INPUT_TEXT),
    "system": (_C.ROLE_SYSTEM, _C.CONTENT_TYPE_INPUT_TEXT),
    "developer": (_C.ROLE_SYSTEM, _C.CONTENT_TYPE_INPUT_TEXT),
    "assistant": (_C.ROLE_ASSISTANT, _C.CONTENT_TYPE_OUTPUT_TEXT),
}


def parse_request(body: dict[str, Any]) -> TurnRequest:
    """Validate a Responses API request body.

    Raises:
        InvalidRequest: naming the offending parameter (`input[1].content`);
            `unsupported_feature` for what Switchboard does not serve
            (`previous_response_id`, reasoning, JSON output, background mode).
    """
    reject_params(body, _SERVED, _NOT_SERVED)
    model = fields.model(body, "")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_value("stream", "Invalid type for 'stream': expected a boolean.")
    config = session_pb2.SessionConfig(model=model, tool_choice="auto")
    echo: Event = {
        "instructions": None,
        "max_output_tokens": None,
        "temperature": 1.0,
        "tools": [],
        "tool_choice": "auto",
        "metadata": bounds.metadata(body.get("metadata"), "metadata") or {},
        "store": body.get("store", True) is not False,
    }
    if body.get("instructions") is not None:
        config.instructions = echo["instructions"] = fields.instructions(body, "")
    if body.get("max_output_tokens") is not None:
        echo["max_output_tokens"] = config.max_output_tokens = fields.max_output_tokens(
            body["max_output_tokens"], ""
        )
    if body.get("temperature") is not None:
        config.temperature = echo["temperature"] = check_temperature(
            body["temperature"], "temperature"
        )
    if body.get("tools") is not None:
        config.tools.extend(fields.function_tools(body["tools"], "tools"))
        echo["tools"] = [_tool_echo(tool) for tool in config.tools]
    if body.get("tool_choice") is not None:
        config.tool_choice = fields.tool_choice(body["tool_choice"], "tool_choice")
        echo["tool_choice"] = body["tool_choice"]
    _check_served_values(body)
    return TurnRequest(
        model=model,
        config=config,
        items=_items(body.get("input")),
        stream=bool(stream),
        echo=echo,
    )


def _tool_echo(tool: common_pb2.ToolDefinition) -> Event:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description or None,
        "parameters": orjson.loads(tool.parameters_json or "{}"),
        "strict": False,
    }


def _check_served_values(body: dict[str, Any]) -> None:
    if body.get("previous_response_id") is not None:
        raise unsupported(
            "previous_response_id",
            "'previous_response_id' is not supported yet: send the whole conversation as 'input'.",
        )
    if body.get("reasoning") is not None:
        raise unsupported("reasoning", "Reasoning options are not supported.")
    if body.get("background") not in (None, False):
        raise unsupported("background", "Background responses are not supported.")
    if body.get("parallel_tool_calls") not in (None, True):
        raise unsupported(
            "parallel_tool_calls", "'parallel_tool_calls' false is not supported yet."
        )
    text = body.get("text")
    if text is not None and text not in ({}, {"format": {"type": "text"}}):
        raise unsupported(
            "text.format", "Only {'format': {'type': 'text'}} is supported as 'text'."
        )
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise invalid_value("truncation", "Invalid value for 'truncation': 'auto' or 'disabled'.")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_value("user", "Invalid type for 'user': expected a string.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_value(
            "stream_options", "Invalid type for 'stream_options': expected an object."
        )


def _items(value: Any) -> list[common_pb2.Item]:
    """The conversation items of `input`: a string (one user message) or a list."""
    if value is None:
        raise missing_parameter("input")
    if isinstance(value, str):
        return [_message("user", value)]
    if not isinstance(value, list) or not value:
        raise invalid_value("input", "'input' must be a string or a non-empty array.")
    if len(value) > bounds.MAX_INPUT_MESSAGES:
        raise value_too_large("input", f"{bounds.MAX_INPUT_MESSAGES} items")
    items = []
    for index, raw in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(raw, dict):
            raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
        kind = raw.get("type", "message")
        if kind == "message":
            role = fields.require_str(raw, "role", where)
            if role not in _ROLES:
                raise invalid_value(
                    f"{where}.role",
                    f"Invalid value: {quote(role)}. Supported values are: 'user', 'system', "
                    "'developer', and 'assistant'.",
                )
            items.append(
                _message(role, text_content(raw.get("content"), f"{where}.content", required=True))
            )
        elif kind == "function_call":
            items.append(
                _C.Item(
                    type=_C.ITEM_TYPE_FUNCTION_CALL,
                    status=_C.ITEM_STATUS_COMPLETED,
                    call_id=fields.require_id(raw, "call_id", where),
                    name=bounds.check_tool_name(
                        fields.require_str(raw, "name", where), f"{where}.name"
                    ),
                    arguments=fields.optional_str(raw, "arguments", where) or "{}",
                )
            )
        elif kind == "function_call_output":
            output = raw.get("output")
            items.append(
                _C.Item(
                    type=_C.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
                    status=_C.ITEM_STATUS_COMPLETED,
                    call_id=fields.require_id(raw, "call_id", where),
                    output=text_content(output, f"{where}.output", required=True),
                )
            )
        else:
            raise unsupported(
                f"{where}.type",
                f"Input items of type {quote(kind)} are not supported: 'message', "
                "'function_call' and 'function_call_output' are.",
            )
    return items


def _message(role: str, text: str) -> common_pb2.Item:
    kind, part = _ROLES[role]
    return _C.Item(
        type=_C.ITEM_TYPE_MESSAGE,
        role=kind,
        status=_C.ITEM_STATUS_COMPLETED,
        content=[_C.ContentPart(type=part, text=text)],
    )


# --- the turn's events into the Responses API's events -------------------------------------


def usage_of(usage: Event) -> Event:
    """The Responses `usage` from the Realtime usage JSON."""
    cached = usage.get("input_token_details", {}).get("cached_tokens", 0)
    return {
        "input_tokens": usage["input_tokens"],
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": usage["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _output_text(text: str) -> Event:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass(slots=True)
class _Visible:
    """An output item the client sees: its id and index in the response's output."""

    item_id: str
    output_index: int


@dataclass(slots=True)
class ResponsesTranslator:
    """A turn's logged events into Responses API events (see the module docstring)."""

    response: Event = field(default_factory=dict)
    client_tools: frozenset[str] = frozenset()
    end: StreamEnd = field(default_factory=StreamEnd)
    _items: dict[str, _Visible] = field(default_factory=dict)
    _output: list[Event] = field(default_factory=list)
    _sequence: int = 0
    _created: bool = False

    def feed(self, event: Event) -> list[Frame]:
        kind = event.get("type")
        if kind == OPEN_MARKER:
            self._open(event)
            return []
        if kind == "response.created":
            if self._created:
                return []
            self._created = True
            return [
                self._frame("response.created", response=self._snapshot("in_progress")),
                self._frame("response.in_progress", response=self._snapshot("in_progress")),
            ]
        if kind == "response.output_item.added":
            return self._item_added(event["item"])
        visible = self._items.get(event.get("item_id", ""))
        if kind in ("response.output_item.done", "conversation.item.done"):
            return self._item_done(event) if kind == "response.output_item.done" else []
        if visible is None:
            if kind == "response.done":
                end_of_turn(self.end, event["response"])
            elif kind == END_MARKER:
                return self._finish()
            return []
        where = {"item_id": visible.item_id, "output_index": visible.output_index}
        if kind == "response.content_part.added":
            return [
                self._frame(
                    "response.content_part.added", **where, content_index=0, part=_output_text("")
                )
            ]
        if kind == "response.output_text.delta":
            self.end.committed = True
            return [
                self._frame(
                    "response.output_text.delta",
                    **where,
                    content_index=0,
                    delta=event["delta"],
                    logprobs=[],
                )
            ]
        if kind == "response.output_text.done":
            return [
                self._frame(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=event["text"],
                    logprobs=[],
                )
            ]
        if kind == "response.content_part.done":
            part = _output_text(event["part"]["text"])
            return [self._frame("response.content_part.done", **where, content_index=0, part=part)]
        if kind == "response.function_call_arguments.delta":
            return [
                self._frame("response.function_call_arguments.delta", **where, delta=event["delta"])
            ]
        if kind == "response.function_call_arguments.done":
            return [
                self._frame(
                    "response.function_call_arguments.done",
                    **where,
                    name=event["name"],
                    arguments=event["arguments"],
                )
            ]
        return []

    def _open(self, event: Event) -> None:
        echo = event["echo"]
        self.client_tools = frozenset(event["client_tools"])
        self.response = {
            "id": "resp_" + event["stream_id"],
            "object": "response",
            "created_at": event["created"],
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": echo["instructions"],
            "max_output_tokens": echo["max_output_tokens"],
            "max_tool_calls": None,
            "model": event["model"],
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": echo["store"],
            "temperature": echo["temperature"],
            "text": {"format": {"type": "text"}},
            "tool_choice": echo["tool_choice"],
            "tools": echo["tools"],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": echo["metadata"],
        }

    def _frame(self, kind: str, **fields: Any) -> Frame:
        frame = Frame({"type": kind, "sequence_number": self._sequence, **fields}, event=kind)
        self._sequence += 1
        return frame

    def _snapshot(self, status: str) -> Event:
        return {**self.response, "status": status, "output": list(self._output)}

    def _item_added(self, item: Event) -> list[Frame]:
        if item["type"] == "function_call":
            if item["name"] not in self.client_tools:
                return []  # a server-side tool: run by the gateway, never shown
            visible = _Visible("fc_" + _suffix(item["id"]), len(self._items))
            body: Event = {
                "id": visible.item_id,
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": item["call_id"],
                "name": item["name"],
            }
            self.end.committed = True
        else:
            visible = _Visible("msg_" + _suffix(item["id"]), len(self._items))
            body = {
                "id": visible.item_id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        self._items[item["id"]] = visible
        return [
            self._frame("response.output_item.added", output_index=visible.output_index, item=body)
        ]

    def _item_done(self, event: Event) -> list[Frame]:
        item = event["item"]
        visible = self._items.get(item["id"])
        if visible is None:
            return []
        status = item.get("status", "completed")
        if item["type"] == "function_call":
            body: Event = {
                "id": visible.item_id,
                "type": "function_call",
                "status": status,
                "arguments": item["arguments"],
                "call_id": item["call_id"],
                "name": item["name"],
            }
        else:
            text = "".join(part.get("text", "") for part in item.get("content", ()))
            body = {
                "id": visible.item_id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [_output_text(text)],
            }
        self._output.append(body)
        return [
            self._frame("response.output_item.done", output_index=visible.output_index, item=body)
        ]

    def _finish(self) -> list[Frame]:
        end = self.end
        final = self._snapshot(end.status)
        final["usage"] = usage_of(end.usage)
        if end.error is not None:
            final["status"] = "failed"
            final["error"] = {"code": end.error["code"], "message": end.error["message"]}
            return [self._frame("response.failed", response=final)]
        if end.status == "incomplete":
            final["incomplete_details"] = {"reason": end.reason}
            return [self._frame("response.incomplete", response=final)]
        self.response = final
        return [self._frame("response.completed", response=final)]


def _suffix(item_id: str) -> str:
    return item_id.partition("_")[2] or item_id


def fold(translator: ResponsesTranslator, frames: list[Frame]) -> Event:
    """The non-streaming answer: the response as its last event carries it."""
    last = frames[-1].data
    assert isinstance(last, dict)
    response: Event = last["response"]
    return response
