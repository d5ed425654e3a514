"""Pure core of the upstream simulator: request body in, reply plan and SSE bytes out.

Nothing here does I/O, sleeps or reads a clock, so every rule of the simulator's
contract (docs/simulator.md) can be unit-tested by feeding request dicts. The
server (``tools.simulator.server``) only adds the clock, the socket and the
per-server state (fault counters and the observation log).

Call order: :func:`parse_overrides` validates server-wide overrides once (at
``POST /_sim/config``); for each request :func:`plan_completion` derives a
:class:`Plan`; then either :func:`stream_script` (``stream: true``) or
:func:`completion_body` renders it. :func:`error_body` renders OpenAI-style errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from tools.simulator.moderation import CATEGORIES, marker

FILLER_WORDS: Final[tuple[str, ...]] = (
    "alpha", "amber", "apple", "arrow", "basil", "beach", "birch", "blue",
    "bread", "brick", "cable", "candle", "cedar", "chalk", "cloud", "coral",
    "delta", "dune", "eagle", "ember", "fern", "field", "flint", "frost",
    "garden", "glass", "granite", "harbor", "hazel", "honey", "island", "ivory",
    "jade", "kettle", "lantern", "lemon", "linen", "maple", "meadow", "mint",
    "nectar", "oak", "ocean", "olive", "orbit", "pebble", "pepper", "pine",
    "quartz", "river", "saffron", "silver", "slate", "stone", "summit", "thunder",
    "timber", "tulip", "velvet", "willow", "winter", "yarrow", "zenith", "zephyr",
)  # fmt: skip
"""Exactly 64 words, so one sha256 byte picks one word without bias (256 % 64 == 0)."""

QUIRKS: Final = frozenset({"single_chunk", "finish_stop", "empty_first_chunk"})
TIMING_KEYS: Final = frozenset({"ttft_ms", "token_delay_ms", "tokens"})
"""Directive keys that still apply when the last message is not a user message."""

# "[[sim" then "{" or whitespace, so ordinary text such as "[[simple]]" is left alone.
_DIRECTIVE_START: Final = re.compile(r"\[\[sim(?=[\s{])\s*")
_TOKEN: Final = re.compile(r"\s*\S+")
_DECODER: Final = json.JSONDecoder()


class RequestError(ValueError):
    """The request (or a directive / config override in it) is invalid: answered with 400."""


@dataclass(frozen=True, slots=True)
class ToolCallSpec:
    """A tool call the simulator is told to emit; ``arguments`` is the wire JSON string."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Every knob of a reply; server defaults, ``/_sim/config`` and directives all set these."""

    ttft_ms: int = 50
    token_delay_ms: int = 10
    tokens: int = 24
    status: int | None = None
    retry_after: float | None = None
    # Sent as `retry-after-ms` (OpenAI's precise form), next to or instead of `retry-after`.
    retry_after_ms: int | None = None
    fail_times: int | None = None
    disconnect_after: int | None = None
    tool_calls: tuple[ToolCallSpec, ...] = ()
    args_chunk: int = 5
    quirk: str | None = None
    echo_context: bool = False
    # Call `tool_calls` again after every tool result: a model stuck in a tool
    # loop, for testing a caller's guard against it.
    tool_loop: bool = False
    # Put the moderation marker of this category (`sbflag-<category>`) in the
    # reply, after `flag_at` tokens (see tools/simulator/moderation.py).
    flag: str | None = None
    flag_at: int = 8


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call as it will be sent (id resolved, arguments possibly truncated)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the server needs to answer one chat completion request."""

    completion_id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    request_key: str
    behaviour: Behaviour
    tokens: tuple[str, ...]
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    message_count: int
    last_user: str

    @property
    def text(self) -> str:
        """The whole reply text (empty for a tool-call reply)."""
        return "".join(self.tokens)


@dataclass(frozen=True, slots=True)
class StreamScript:
    """SSE events split by role: ``head`` before the first token, one event per token, ``tail``.

    The server sends ``head`` at once, paces ``tokens`` (time to first token, then the
    inter-token delay) and sends ``tail`` (finish chunk, usage chunk, ``[DONE]``) last.
    """

    head: bytes
    tokens: tuple[bytes, ...]
    tail: bytes


# ---------------------------------------------------------------- directives / overrides


def _number(low: int, high: float = math.inf, *, integer: bool = True) -> Callable[[object], bool]:
    def accepts(value: object) -> bool:
        # bool is an int subclass, but JSON `true` is never a millisecond count.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return low <= value <= high and (isinstance(value, int) or not integer)

    return accepts


# key -> (accepts value, what it must be, whether null means "unset")
_OVERRIDE_RULES: Final[dict[str, tuple[Callable[[object], bool], str, bool]]] = {
    "ttft_ms": (_number(0), "an integer >= 0", False),
    "token_delay_ms": (_number(0), "an integer >= 0", False),
    "tokens": (_number(0), "an integer >= 0", False),
    "status": (_number(400, 599), "an HTTP error status 400..599", True),
    "retry_after": (_number(0, integer=False), "a number of seconds >= 0", True),
    "retry_after_ms": (_number(0), "an integer number of milliseconds >= 0", True),
    "fail_times": (_number(0), "an integer >= 0", True),
    "disconnect_after": (_number(0), "an integer >= 0", True),
    "tool_calls": (lambda v: isinstance(v, list), "a list of tool calls", False),
    "tool_loop": (lambda v: isinstance(v, bool), "true or false", False),
    "args_chunk": (_number(1), "an integer >= 1", False),
    "quirk": (lambda v: isinstance(v, str) and v in QUIRKS, f"one of {sorted(QUIRKS)}", True),
    "echo_context": (lambda v: isinstance(v, bool), "a boolean", False),
    "flag": (lambda v: isinstance(v, str) and v in CATEGORIES, "a moderation category", True),
    "flag_at": (_number(0), "an integer >= 0", False),
}


def _tool_call_spec(item: object) -> ToolCallSpec:
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
        raise RequestError("each simulator tool_calls item needs a non-empty string 'name'")
    args = item.get("arguments", {})
    # A string is sent verbatim (it may be deliberately invalid JSON); anything else is encoded.
    arguments = args if isinstance(args, str) else orjson.dumps(args).decode()
    call_id = item.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise RequestError("simulator tool_calls 'id' must be a string")
    return ToolCallSpec(name=item["name"], arguments=arguments, id=call_id)


def parse_overrides(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a directive or ``/_sim/config`` object into :class:`Behaviour` field values.

    Args:
        raw: The JSON object as given. ``null`` for an optional key means "unset".

    Returns:
        Field name → validated value, ready for ``dataclasses.replace(behaviour, **result)``.

    Raises:
        RequestError: On an unknown key or a value of the wrong type or range.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _OVERRIDE_RULES:
            raise RequestError(f"unknown simulator key {key!r}")
        accepts, meaning, nullable = _OVERRIDE_RULES[key]
        if value is None and nullable:
            out[key] = None
        elif accepts(value):
            out[key] = value
        else:
            raise RequestError(f"simulator key {key!r} must be {meaning}")
    if "tool_calls" in out:
        out["tool_calls"] = tuple(_tool_call_spec(item) for item in out["tool_calls"])
    return out


def split_directives(text: str) -> tuple[str, dict[str, Any]]:
    """Remove every ``[[sim {...}]]`` directive from ``text``.

    Returns:
        The text without directives, stripped, and the directive objects merged in order
        (a later key wins). The objects are returned raw; see :func:`parse_overrides`.

    Raises:
        RequestError: If a directive is not a JSON object followed by ``]]``.
    """
    if "[[sim" not in text:
        return text.strip(), {}
    merged: dict[str, Any] = {}
    kept: list[str] = []
    pos = 0
    while (match := _DIRECTIVE_START.search(text, pos)) is not None:
        kept.append(text[pos : match.start()])
        try:
            # raw_decode finds where the object ends, so "]]" inside JSON strings is harmless.
            obj, end = _DECODER.raw_decode(text, match.end())
        except json.JSONDecodeError as exc:
            raise RequestError(f"simulator directive is not valid JSON: {exc}") from None
        close = text.find("]]", end)
        if not isinstance(obj, dict) or close < 0 or text[end:close].strip():
            raise RequestError("simulator directive must be [[sim {JSON object}]]")
        merged.update(obj)
        pos = close + 2
    kept.append(text[pos:])
    return "".join(kept).strip(), merged


# ---------------------------------------------------------------- deriving the reply


def content_text(content: object) -> str:
    """Text of a message ``content``: a string, or the text parts of a list joined with ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def canonical_json(value: object) -> bytes:
    """Compact JSON with sorted keys: the input of every hash the simulator takes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def request_key(model: str, messages: Sequence[object]) -> str:
    """sha256 hex of the canonical JSON of ``{"model", "messages"}``: identifies a retry."""
    return hashlib.sha256(canonical_json({"model": model, "messages": messages})).hexdigest()


def tokenize(text: str) -> list[str]:
    """Split into words, each with its leading whitespace, so ``"".join(result) == text``."""
    tokens = _TOKEN.findall(text)
    tail = len(text) - sum(map(len, tokens))
    if tail:  # trailing whitespace rides on the last token rather than being lost
        if tokens:
            tokens[-1] += text[-tail:]
        else:
            tokens.append(text)
    return tokens


def filler_words(messages: Sequence[object], count: int) -> list[str]:
    """``count`` words from :data:`FILLER_WORDS`, seeded by sha256 of the canonical messages."""
    seed = hashlib.sha256(canonical_json(messages)).digest()
    words: list[str] = []
    block = 0
    while len(words) < count:
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        words.extend(FILLER_WORDS[b % 64] for b in digest[: count - len(words)])
        block += 1
    return words


def _calls_of(message: Mapping[str, Any]) -> list[object]:
    calls = message.get("tool_calls")
    return calls if isinstance(calls, list) else []


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """ceil(characters of message contents + tool-call argument strings + ``tools`` JSON / 4)."""
    chars = 0
    for message in body["messages"]:
        chars += len(content_text(message.get("content")))
        for call in _calls_of(message):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                chars += len(fn["arguments"])
    if body.get("tools"):
        chars += len(orjson.dumps(body["tools"]).decode())
    return max(1, math.ceil(chars / 4))


def _tool_name(messages: Sequence[Mapping[str, Any]], call_id: object) -> str:
    for message in messages:
        if message.get("role") == "assistant":
            for call in _calls_of(message):
                if isinstance(call, Mapping) and call.get("id") == call_id:
                    fn = call.get("function")
                    name = fn.get("name") if isinstance(fn, Mapping) else None
                    return name if isinstance(name, str) else "?"
    return "?"


def _truncate_calls(calls: list[ToolCall], budget_chars: int) -> list[ToolCall]:
    # Like a real model hitting max_tokens mid-call: later calls are never started.
    kept: list[ToolCall] = []
    for call in calls:
        if budget_chars <= 0:
            break
        kept.append(dataclasses.replace(call, arguments=call.arguments[:budget_chars]))
        budget_chars -= len(call.arguments)
    return kept


def _validated(body: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]], int | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    if not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise RequestError("each message must be an object with a string 'role'")
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None and not _number(1)(limit):
        raise RequestError("'max_tokens' / 'max_completion_tokens' must be an integer >= 1")
    return model, messages, limit


def plan_completion(
    body: Mapping[str, Any], defaults: Behaviour, *, completion_id: str, created: int
) -> Plan:
    """Derive the deterministic reply for a ``POST /v1/chat/completions`` body.

    Args:
        body: The decoded request JSON.
        defaults: Server-wide behaviour (CLI defaults with ``/_sim/config`` applied); the
            directive of the last user message overrides it (only :data:`TIMING_KEYS` when
            the last message is not a user message).
        completion_id: The ``chatcmpl-...`` id to put in every chunk.
        created: Unix seconds for the ``created`` field.

    Returns:
        The plan: reply tokens or tool calls, finish reason, usage and effective behaviour.
        Fault keys (``status``, ``disconnect_after``) are left for the server to act on.

    Raises:
        RequestError: If the body or a directive in it is invalid.
    """
    model, messages, limit = _validated(body)
    users: list[str] = []
    directive: dict[str, Any] = {}
    for message in messages:
        if message["role"] == "user":
            text, directive = split_directives(content_text(message.get("content")))
            users.append(text)
    last = messages[-1]
    role = last["role"]
    overrides = parse_overrides(directive)
    looping = role == "tool" and overrides.get("tool_loop") is True
    if role != "user" and not looping:
        overrides = {k: v for k, v in overrides.items() if k in TIMING_KEYS}
    behaviour = dataclasses.replace(defaults, **overrides)
    key = request_key(model, messages)

    calls: list[ToolCall] = []
    tokens: list[str] = []
    if (role == "user" or looping) and behaviour.tool_calls:
        calls = [
            ToolCall(
                id=spec.id or "call_" + hashlib.sha256(f"{key}{i}".encode()).hexdigest()[:12],
                name=spec.name,
                arguments=spec.arguments,
            )
            for i, spec in enumerate(behaviour.tool_calls)
        ]
    else:
        if role == "user":
            core = f'turn {len(users)}: you said "{users[-1]}"'
            if len(users) > 1:
                core += "; earlier: " + " | ".join(f'"{u}"' for u in users[:-1])
            core += "."
        elif role == "tool":
            name = _tool_name(messages, last.get("tool_call_id"))
            core = f"tool {name} returned {content_text(last.get('content'))}"
        else:
            core = f"turn {len(users)}: nothing to answer."
        if behaviour.echo_context:
            core += f" context={len(messages)}"
        tokens = tokenize(core)
        missing = behaviour.tokens - len(tokens)
        if missing > 0:
            tokens.extend(" " + word for word in filler_words(messages, missing))
        if behaviour.flag is not None:
            tokens.insert(min(behaviour.flag_at, len(tokens)), " " + marker(behaviour.flag))

    finish = "tool_calls" if calls else "stop"
    if calls:
        completion = max(1, math.ceil(sum(len(c.arguments) for c in calls) / 4))
        if limit is not None and completion > limit:
            calls, completion, finish = _truncate_calls(calls, limit * 4), limit, "length"
    else:
        if limit is not None and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        completion = len(tokens)
    if finish == "tool_calls" and behaviour.quirk == "finish_stop":
        finish = "stop"

    options = body.get("stream_options")
    return Plan(
        completion_id=completion_id,
        created=created,
        model=model,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, Mapping) and options.get("include_usage") is True,
        request_key=key,
        behaviour=behaviour,
        tokens=tuple(tokens),
        tool_calls=tuple(calls),
        finish_reason=finish,
        prompt_tokens=prompt_tokens(body),
        completion_tokens=completion,
        message_count=len(messages),
        last_user=users[-1] if users else "",
    )


# ---------------------------------------------------------------- rendering


def usage(plan: Plan) -> dict[str, Any]:
    """The OpenAI ``usage`` object of a plan."""
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _call_delta(index: int, call: ToolCall, arguments: str) -> dict[str, Any]:
    function = {"name": call.name, "arguments": arguments}
    return {"index": index, "id": call.id, "type": "function", "function": function}


def _tool_call_deltas(plan: Plan) -> list[dict[str, Any]]:
    if plan.behaviour.quirk == "single_chunk":
        return [
            {"tool_calls": [_call_delta(i, c, c.arguments)]} for i, c in enumerate(plan.tool_calls)
        ]
    deltas: list[dict[str, Any]] = []
    step = plan.behaviour.args_chunk
    for i, c in enumerate(plan.tool_calls):
        deltas.append({"tool_calls": [_call_delta(i, c, "")]})
        for start in range(0, len(c.arguments), step):
            fragment = c.arguments[start : start + step]
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]})
    return deltas


def stream_script(plan: Plan) -> StreamScript:
    """Render a plan as OpenAI ``chat.completion.chunk`` SSE events.

    The envelope (id, created, model, ...) is encoded once and only each delta is
    encoded per token, which keeps the simulator cheap enough to be a benchmark baseline.
    """
    envelope = orjson.dumps(
        {
            "id": plan.completion_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": "sim",
        }
    )
    prefix = b"data: " + envelope[:-1] + b',"choices":[{"index":0,"delta":'
    null_usage = b',"usage":null' if plan.include_usage else b""
    suffix = b',"logprobs":null,"finish_reason":null}]' + null_usage + b"}\n\n"

    head = b""
    if plan.behaviour.quirk == "empty_first_chunk":
        head = b"data: " + envelope[:-1] + b',"choices":[]}\n\n'
    head += prefix + b'{"role":"assistant","content":""}' + suffix

    if plan.tool_calls:
        tokens = tuple(prefix + orjson.dumps(d) + suffix for d in _tool_call_deltas(plan))
    else:
        tokens = tuple(
            prefix + b'{"content":' + orjson.dumps(t) + b"}" + suffix for t in plan.tokens
        )

    finish = orjson.dumps(plan.finish_reason)
    tail = prefix + b'{},"logprobs":null,"finish_reason":' + finish + b"}]" + null_usage + b"}\n\n"
    if plan.include_usage:
        body = envelope[:-1] + b',"choices":[],"usage":' + orjson.dumps(usage(plan)) + b"}"
        tail += b"data: " + body + b"\n\n"
    return StreamScript(head=head, tokens=tokens, tail=tail + b"data: [DONE]\n\n")


def completion_body(plan: Plan) -> bytes:
    """Render a plan as a non-streaming ``chat.completion`` JSON body."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if plan.tool_calls else plan.text,
        "refusal": None,
        "annotations": [],
    }
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in plan.tool_calls
        ]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}
    return orjson.dumps(
        {
            "id": plan.completion_id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": "sim",
            "choices": [choice],
            "usage": usage(plan),
        }
    )


_ERROR_TYPES: Final = {429: "requests"}
_ERROR_CODES: Final = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "model_not_found"}


def error_body(status: int, message: str, *, code: str | None = None) -> bytes:
    """An OpenAI-style error body: ``{"error": {"message", "type", "code", "param"}}``.

    ``type`` and the default ``code`` follow what api.openai.com sends for the status
    (``server_error`` for 5xx, ``requests``/``rate_limit_exceeded`` for 429).
    """
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": kind,
                "code": code if code is not None else _ERROR_CODES.get(status),
                "param": None,
            }
        }
    )
