"""Validation of client event fields: each failure names the field as OpenAI does."""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter
from switchboard.v1 import common_pb2

_C = common_pb2
MAX_OUTPUT_TOKENS_LIMIT = 1_000_000
Event = dict[str, Any]


def require_str(obj: Event, key: str, parent: str = "") -> str:
    param = f"{parent}.{key}" if parent else key
    value = obj.get(key)
    if value is None:
        raise missing_parameter(param)
    if not isinstance(value, str):
        raise invalid_value(param, f"Invalid type for '{param}': expected a string.")
    return value


def optional_str(obj: Event, key: str, parent: str = "") -> str:
    """The string at `key`, "" when absent or null."""
    if obj.get(key) is None:
        return ""
    return require_str(obj, key, parent)


def reject_unknown(obj: Event, known: frozenset[str], parent: str) -> None:
    for key in obj:
        if key not in known:
            raise InvalidRequest(
                f"Unknown parameter: '{parent}.{key[:64]}'.",
                code=_C.ERROR_CODE_UNKNOWN_PARAMETER,
                param=f"{parent}.{key[:64]}",
            )


def max_output_tokens(value: Any, parent: str) -> int:
    param = f"{parent}.max_output_tokens"
    if value == "inf":
        return 0
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_OUTPUT_TOKENS_LIMIT
    ):
        raise invalid_value(
            param, f"Invalid value for '{param}': expected 'inf' or a positive integer."
        )
    return value


def output_modalities(value: Any, parent: str) -> list[str]:
    param = f"{parent}.output_modalities"
    if not isinstance(value, list) or not all(v in ("text", "audio") for v in value):
        raise invalid_value(
            param, f"Invalid value for '{param}': expected a list of 'text' or 'audio'."
        )
    # Switchboard answers in text whatever the client asked for; see docs/protocol.md.
    return ["text"]


def function_tools(value: Any, param: str) -> list[common_pb2.ToolDefinition]:
    if not isinstance(value, list):
        raise invalid_value(param, f"Invalid type for '{param}': expected an array.")
    tools = []
    for index, raw in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(raw, dict):
            raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
        if raw.get("type", "function") != "function":
            raise InvalidRequest(
                f"Tool type '{raw.get('type')}' is not supported; use 'function'.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{where}.type",
            )
        name = require_str(raw, "name", where)
        description = raw.get("description") or ""
        parameters = raw.get("parameters") or {}
        if not isinstance(description, str):
            raise invalid_value(f"{where}.description", "Invalid type: expected a string.")
        if not isinstance(parameters, dict):
            raise invalid_value(
                f"{where}.parameters", "Invalid type: expected a JSON Schema object."
            )
        tools.append(
            common_pb2.ToolDefinition(
                name=name,
                description=description,
                parameters_json=orjson.dumps(parameters).decode(),
                location=_C.TOOL_LOCATION_CLIENT,
            )
        )
    return tools


def tool_choice(value: Any, param: str) -> str:
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if isinstance(name, str) and name:
            return name
    raise invalid_value(
        param,
        f"Invalid value for '{param}': expected 'auto', 'none', 'required' or "
        "{'type': 'function', 'name': ...}.",
    )
