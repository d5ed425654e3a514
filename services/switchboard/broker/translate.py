"""The broker's pure core: Switchboard requests to Chat Completions and back.

Nothing here does I/O. `chat_request` turns a `GenerateRequest` into the JSON
payload of a streamed `POST /chat/completions`; `ChunkTranslator` turns the
upstream's stream chunks (already decoded to dicts) into events
(`events.Event`: a text delta as its `str`, the others as `GenerateEvent`s).

Call order of `ChunkTranslator`: `feed(chunk)` for every chunk in stream order,
then `finish()` once, after the stream ended with `[DONE]`. `usage()` may be
called at any time (for example to log an estimate for a cancelled call), and
`response_model` / `response_id` read once the first chunk is in.

OpenAI-compatible servers differ in small ways; the translator accepts all of
these: a first chunk with `choices: []` and no usage (Azure), a whole tool call
in one chunk (vLLM, Ollama), `finish_reason: "stop"` after tool calls, tool-call
fragments without `index`, `content: null`, and no usage chunk at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from switchboard.broker.events import Event
from switchboard.errors import InvalidRequest
from switchboard.tokens import estimated_usage
from switchboard.v1 import broker_pb2, common_pb2, session_pb2

_ROLES = {
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_SYSTEM: "system",
}
_TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})
_FINISH_REASONS: dict[str, broker_pb2.FinishReason.ValueType] = {
    "stop": broker_pb2.FINISH_REASON_STOP,
    "length": broker_pb2.FINISH_REASON_LENGTH,
    "tool_calls": broker_pb2.FINISH_REASON_TOOL_CALLS,
    # The pre-tools name some older compatible servers still send.
    "function_call": broker_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": broker_pb2.FINISH_REASON_CONTENT_FILTER,
}


def chat_request(req: broker_pb2.GenerateRequest, upstream_model: str | None) -> dict[str, Any]:
    """The body of a streamed Chat Completions request for `req`.

    Args:
        req: the broker request; its `context` holds the instructions and the
            conversation items, oldest first.
        upstream_model: when set, used instead of `req.model` (a deployment
            that maps every requested model to one upstream model).

    Returns:
        A JSON-ready dict with `model`, `messages`, the options that were set,
        `stream: True` and `stream_options: {"include_usage": True}`.

    Raises:
        InvalidRequest: no model is named, or a tool's `parameters_json` is not
            a JSON object.
    """
    model = upstream_model or req.model
    if not model:
        raise InvalidRequest(
            "The request names no model.",
            code=common_pb2.ERROR_CODE_MISSING_REQUIRED_PARAMETER,
            param="model",
        )
    payload: dict[str, Any] = {"model": model, "messages": chat_messages(req.context)}
    if req.tools:
        payload["tools"] = [_tool(tool) for tool in req.tools]
        if req.tool_choice:
            payload["tool_choice"] = _tool_choice(req.tool_choice)
    if req.max_output_tokens > 0:
        payload["max_completion_tokens"] = req.max_output_tokens
    if req.HasField("temperature"):
        # The proto field is a float32: 0.7 arrives as 0.699999988...; send what was meant.
        payload["temperature"] = round(req.temperature, 6)
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    return payload


def chat_messages(context: session_pb2.Context) -> list[dict[str, Any]]:
    """The Chat Completions `messages` for a `switchboard.v1.Context`.

    The instructions become a leading system message. Consecutive function
    calls become one assistant message with several `tool_calls` (parallel
    calls of one turn), and each function call output a `tool` message.
    """
    messages: list[dict[str, Any]] = []
    if context.instructions:
        messages.append({"role": "system", "content": context.instructions})
    calls: list[dict[str, Any]] = []
    for item in context.items:
        if item.type == common_pb2.ITEM_TYPE_FUNCTION_CALL:
            calls.append(
                {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"},
                }
            )
            continue
        if calls:
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            calls = []
        if item.type == common_pb2.ITEM_TYPE_MESSAGE:
            text = "".join(part.text for part in item.content)
            messages.append({"role": _ROLES.get(item.role, "user"), "content": text})
        elif item.type == common_pb2.ITEM_TYPE_FUNCTION_CALL_OUTPUT:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        elif item.type == common_pb2.ITEM_TYPE_MCP_CALL:
            messages.extend(_mcp_call(item))
        elif item.type == common_pb2.ITEM_TYPE_SUMMARY:
            text = "".join(part.text for part in item.content)
            messages.append({"role": "system", "content": SUMMARY_PREFIX + text})
    if calls:
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
    return messages


# How a summary of earlier turns (ITEM_TYPE_SUMMARY) is introduced to the model.
SUMMARY_PREFIX = "Summary of the earlier conversation: "


def _mcp_call(item: common_pb2.Item) -> list[dict[str, Any]]:
    """An MCP call that ran (or was refused), as the function call the model made
    (`<label>__<tool>`) and its result; nothing for one that never ran. Other MCP
    items (listings, approval requests and answers) are not sent to the model."""
    if not item.output and not item.error_json:
        return []
    call = {
        "id": item.call_id,
        "type": "function",
        "function": {
            "name": f"{item.server_label}__{item.name}",
            "arguments": item.arguments or "{}",
        },
    }
    result = (
        item.output if not item.error_json else json.dumps({"error": json.loads(item.error_json)})
    )
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": item.call_id, "content": result},
    ]


def _tool(tool: common_pb2.ToolDefinition) -> dict[str, Any]:
    try:
        parameters = orjson.loads(tool.parameters_json or "{}")
    except orjson.JSONDecodeError:
        parameters = None
    if not isinstance(parameters, dict):
        raise InvalidRequest(
            f"The parameters of tool {tool.name!r} are not a JSON object.", param="tools"
        )
    function: dict[str, Any] = {"name": tool.name, "parameters": parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in _TOOL_CHOICE_MODES:
        return choice
    return {"type": "function", "function": {"name": choice}}


@dataclass(slots=True)
class _Call:
    """A tool call being assembled from its fragments."""

    index: int
    call_id: str
    # False when the upstream sent no id and call_id was made up.
    upstream_id: bool
    name: str = ""
    arguments: str = ""
    # True once the ToolCallDelta carrying call_id and name went out.
    announced: bool = False


class ChunkTranslator:
    """Turns the chunks of one streamed chat completion into events (`events.Event`).

    Text deltas become their text (a `str`; `TextDelta` on the wire).
    Tool-call fragments are accumulated by their `index` (parallel calls
    interleave; arguments arrive split over many chunks) and each fragment is
    also streamed as a `ToolCallDelta`: the first delta of a call carries its
    `call_id` and `name`, later ones only argument text. `finish()` returns
    the `Finished` event with the finish reason, the usage (the upstream's, or
    an estimate) and the assembled calls.
    """

    def __init__(self, *, estimated_input_tokens: int = 0, call_id_prefix: str = "call_") -> None:
        """Args:
        estimated_input_tokens: the prompt size to report when the upstream
            sends no usage (the session service's estimate of the context).
        call_id_prefix: a call whose upstream sends no id gets this prefix
            plus its index; make it unique per response.
        """
        self._estimated_input_tokens = max(estimated_input_tokens, 0)
        self._call_id_prefix = call_id_prefix
        self._calls: list[_Call] = []
        self._by_upstream_index: dict[int, _Call] = {}
        self._last_call: _Call | None = None
        self._finish_reason: str | None = None
        self._upstream_usage: dict[str, Any] | None = None
        self._text_chars = 0
        # What the upstream says it answered with (for traces), from the first chunk that says.
        self.response_model = ""
        self.response_id = ""

    def feed(self, chunk: dict[str, Any] | str) -> list[Event]:
        """The events for one upstream chunk, in order (often one, possibly none).

        A chunk is its decoded JSON, or, for a chunk whose only effect here
        is its text (see `text_only`), that text (`ChatStream.read`'s fast path).
        """
        if isinstance(chunk, str):
            if not chunk:
                return []
            self._text_chars += len(chunk)
            return [chunk]
        if not self.response_model:
            model, completion_id = chunk.get("model"), chunk.get("id")
            self.response_model = model if isinstance(model, str) else ""
            self.response_id = completion_id if isinstance(completion_id, str) else ""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._upstream_usage = usage
        events: list[Event] = []
        for choice in chunk.get("choices") or ():
            # Switchboard never asks for n > 1; ignore any other choice.
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._feed_delta(delta, events)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish_reason = reason
        return events

    def _feed_delta(self, delta: dict[str, Any], events: list[Event]) -> None:
        for key in ("content", "refusal"):
            # A refusal is what the model says instead of an answer: show it as text.
            text = delta.get(key)
            if text and isinstance(text, str):
                self._text_chars += len(text)
                events.append(text)
        for fragment in delta.get("tool_calls") or ():
            if isinstance(fragment, dict):
                event = self._feed_tool_call(fragment)
                if event is not None:
                    events.append(event)

    def _feed_tool_call(self, fragment: dict[str, Any]) -> broker_pb2.GenerateEvent | None:
        call_id = fragment.get("id") or ""
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name") or ""
        arguments = function.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            # Some servers send the arguments as an already-parsed JSON object.
            arguments = json.dumps(arguments, separators=(",", ":"))

        call = self._call_for(fragment.get("index"), call_id)
        if not call.name and name:
            call.name = name
        call.arguments += arguments
        if not call.announced:
            if not call.name:
                return None  # hold the arguments until the name is known
            call.announced = True
            delta = broker_pb2.ToolCallDelta(
                index=call.index, call_id=call.call_id, name=call.name, arguments=call.arguments
            )
            return broker_pb2.GenerateEvent(tool_call_delta=delta)
        if not arguments:
            return None
        delta = broker_pb2.ToolCallDelta(index=call.index, arguments=arguments)
        return broker_pb2.GenerateEvent(tool_call_delta=delta)

    def _call_for(self, upstream_index: Any, call_id: str) -> _Call:
        if isinstance(upstream_index, int):
            call = self._by_upstream_index.get(upstream_index)
        else:
            # No index: a fragment without an id (or with the same id) continues
            # the call seen last; the first call is call 0.
            call = self._last_call
        if call is not None and call_id and call.upstream_id and call_id != call.call_id:
            # A different id where a call already is: a new call (some servers
            # send every call of a turn at index 0, or no index at all).
            call = None
        if call is None:
            # Our indices count calls in order of appearance, whatever the upstream's are.
            index = len(self._calls)
            call = _Call(
                index=index,
                call_id=call_id or f"{self._call_id_prefix}{index}",
                upstream_id=bool(call_id),
            )
            self._calls.append(call)
            if isinstance(upstream_index, int):
                self._by_upstream_index[upstream_index] = call
        self._last_call = call
        return call

    @property
    def finish_reason(self) -> broker_pb2.FinishReason.ValueType:
        """The `FinishReason` so far: `stop` after tool calls counts as TOOL_CALLS."""
        reason = _FINISH_REASONS.get(self._finish_reason or "stop", broker_pb2.FINISH_REASON_STOP)
        if self._calls and reason == broker_pb2.FINISH_REASON_STOP:
            return broker_pb2.FINISH_REASON_TOOL_CALLS
        return reason

    def usage(self) -> common_pb2.Usage:
        """The upstream's usage when it sent one, else an estimate (`estimated=True`).

        The estimate takes the input from the context's estimate and the output
        as ceil(characters of text and tool arguments / 4). Every count is set.
        """
        raw = self._upstream_usage
        if raw is not None:
            details = raw.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            input_tokens = _count(raw.get("prompt_tokens"))
            output_tokens = _count(raw.get("completion_tokens"))
            total = _count(raw.get("total_tokens")) or input_tokens + output_tokens
            return common_pb2.Usage(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                total_tokens=total,
                cached_input_tokens=_count(cached),
            )
        chars = self._text_chars + sum(len(call.arguments) for call in self._calls)
        return estimated_usage(self._estimated_input_tokens, chars)

    def finish(self) -> broker_pb2.GenerateEvent:
        """The `Finished` event; call once, after the upstream stream ended.

        `tool_calls` holds the assembled calls when the reason is TOOL_CALLS.
        """
        reason = self.finish_reason
        calls = []
        if reason == broker_pb2.FINISH_REASON_TOOL_CALLS:
            calls = [
                common_pb2.ToolCall(call_id=c.call_id, name=c.name, arguments=c.arguments)
                for c in self._calls
            ]
        finished = broker_pb2.Finished(reason=reason, usage=self.usage(), tool_calls=calls)
        return broker_pb2.GenerateEvent(finished=finished)


def text_only(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that `ChunkTranslator.feed` turns into that text and nothing
    else, whatever came before it; None for any other chunk.

    Such a chunk has one choice (index 0) whose delta is `{"content": <str>}`, no
    finish reason and no usage: feeding it again, or another like it with other
    text, changes nothing but the text it adds (`response_model` and
    `response_id` are taken from the first chunk only).
    """
    if isinstance(chunk.get("usage"), dict):
        return None
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None
    (choice,) = choices
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return None
    reason = choice.get("finish_reason")
    if isinstance(reason, str) and reason:
        return None
    delta = choice.get("delta")
    if not isinstance(delta, dict) or len(delta) != 1:
        return None
    text = delta.get("content")
    return text if isinstance(text, str) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0
