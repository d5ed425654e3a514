"""Bounds on what a client sends, and the checks that enforce them.

Every value a client sends the gateway has a limit, documented in one table
(docs/input-limits.md; tests/gateway/test_bounds.py checks that the table and
these constants agree). A value over its limit gets a specific error naming
it: `value_too_large` (with `param`), `json_too_deep`, `frame_too_large`, or
at the transport an HTTP status (transport.py). The frame and event sizes are
settings (`SWITCHBOARD_GATEWAY_MAX_FRAME_BYTES`, `..._MAX_EVENT_BYTES`), as is
the handshake time (`..._HANDSHAKE_TIMEOUT_S`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from switchboard.errors import InvalidRequest, invalid_value, quote, value_too_large
from switchboard.v1 import common_pb2

# JSON nesting: far below the 254 levels the JSON writer can echo back, and
# above any tool schema a model is given.
MAX_JSON_DEPTH = 32
# Ids a client names: items, previous items, call ids, responses, its event ids.
MAX_ID_CHARS = 64
# Model names (the `model` query parameter, `session.model`): printable ASCII
# without spaces, as every provider names its models.
MAX_MODEL_CHARS = 64
MODEL_NAME = re.compile(r"[\x21-\x7e]{1,64}")
# Instructions (session, response, client secrets).
MAX_INSTRUCTIONS_CHARS = 64 * 1024
# Function tools a session or response declares, as OpenAI bounds them.
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOL_DESCRIPTION_CHARS = 4096
MAX_TOOL_SCHEMA_BYTES = 16 * 1024
# `metadata` of a response: the GA limits.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# An HTTP request body (client secrets).
MAX_BODY_BYTES = 256 * 1024
# The body of a Chat Completions or Responses request (it carries the whole
# conversation), its messages, and how long it may take to arrive.
MAX_GENERATE_BODY_BYTES = 4 * 1024 * 1024
MAX_INPUT_MESSAGES = 1024
BODY_TIMEOUT_S = 30.0
# The request head of any HTTP request or WebSocket handshake (transport.py).
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEADER_LINE_BYTES = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100

_C = common_pb2


def json_depth(value: Any, stop_after: int | None = None) -> int:
    """How deeply `value` nests arrays and objects (a scalar is 0); counting stops
    past `stop_after` levels."""
    depth = 0
    level = [value] if isinstance(value, dict | list) else []
    while level and (stop_after is None or depth <= stop_after):
        depth += 1
        below: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            below.extend(child for child in children if isinstance(child, dict | list))
        level = below
    return depth


def loads_object(data: str | bytes, what: str) -> dict[str, Any]:
    """Parse a client's JSON object (a frame, a request body) within the depth bound.

    Raises:
        InvalidRequest: `invalid_json`, `json_too_deep`, or `invalid_value` when
            the JSON is not an object.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg:
            raise too_deep(what) from None
        raise InvalidRequest(
            f"The {what} is not valid JSON ({exc.msg} at position {exc.pos}).",
            code=_C.ERROR_CODE_INVALID_JSON,
        ) from None
    # Most frames hold fewer brackets than the bound: no need to walk them.
    if isinstance(data, str):
        brackets = data.count("{") + data.count("[")
    else:
        brackets = data.count(b"{") + data.count(b"[")
    if brackets > MAX_JSON_DEPTH and json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep(what)
    if not isinstance(value, dict):
        raise InvalidRequest(f"The {what} must be a JSON object.", code=_C.ERROR_CODE_INVALID_VALUE)
    return value


def too_deep(what: str) -> InvalidRequest:
    return InvalidRequest(
        f"The {what} nests JSON deeper than {MAX_JSON_DEPTH} levels.",
        code=_C.ERROR_CODE_JSON_TOO_DEEP,
    )


def check_chars(value: str, param: str, limit: int) -> str:
    """`value` if it has at most `limit` characters, else `value_too_large`."""
    if len(value) > limit:
        raise value_too_large(param, f"{limit} characters")
    return value


def check_id(value: str, param: str) -> str:
    """An id the client names: at most `MAX_ID_CHARS` characters."""
    return check_chars(value, param, MAX_ID_CHARS)


def check_model(value: str, param: str) -> str:
    """A model name: `value_too_large` over 64 characters, `invalid_value` for
    anything but printable ASCII without spaces."""
    check_chars(value, param, MAX_MODEL_CHARS)
    if not MODEL_NAME.fullmatch(value):
        raise invalid_value(
            param, f"Invalid value for '{param}': a model name is printable ASCII, no spaces."
        )
    return value


def check_tool_name(value: str, param: str) -> str:
    """A function name as OpenAI accepts it: 1-64 of [A-Za-z0-9_-]."""
    if not TOOL_NAME.fullmatch(value):
        raise invalid_value(
            param,
            f"Invalid value for '{param}': {quote(value)}; a function name is 1 to 64 "
            "characters from [A-Za-z0-9_-].",
        )
    return value


def check_serialized(value: Any, param: str, limit: int) -> str:
    """`value` as compact JSON, if that is at most `limit` bytes."""
    text = orjson.dumps(value).decode()
    if len(text) > limit:
        raise value_too_large(param, f"{limit} bytes of JSON")
    return text


def metadata(value: Any, param: str) -> dict[str, str] | None:
    """A `metadata` object: at most 16 string keys of 64 characters, string values
    of 512 characters (the GA limits); null is none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_value(param, f"Invalid type for '{param}': expected an object.")
    if len(value) > MAX_METADATA_KEYS:
        raise value_too_large(param, f"{MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        check_chars(key, f"{param} key", MAX_METADATA_KEY_CHARS)
        if not isinstance(item, str):
            raise invalid_value(
                f"{param}.{key}", f"Invalid type for '{param}.{key}': expected a string."
            )
        check_chars(item, f"{param}.{key}", MAX_METADATA_VALUE_CHARS)
    return value
