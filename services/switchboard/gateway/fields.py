"""Validation of client event fields: each failure names the field as OpenAI does."""

from __future__ import annotations

from typing import Any

from switchboard.errors import (
    InvalidRequest,
    invalid_value,
    missing_parameter,
    quote,
    value_too_large,
)
from switchboard.gateway import bounds
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


def require_id(obj: Event, key: str, parent: str = "") -> str:
    """A required id (`item_id`, `call_id`): a string within `bounds.MAX_ID_CHARS`."""
    param = f"{parent}.{key}" if parent else key
    return bounds.check_id(require_str(obj, key, parent), param)


def optional_id(obj: Event, key: str, parent: str = "") -> str:
    """An optional id, "" when absent or null."""
    if obj.get(key) is None:
        return ""
    return require_id(obj, key, parent)


def instructions(obj: Event, parent: str) -> str:
    """`instructions`: a string within `bounds.MAX_INSTRUCTIONS_CHARS`."""
    value = require_str(obj, "instructions", parent)
    return bounds.check_chars(value, f"{parent}.instructions", bounds.MAX_INSTRUCTIONS_CHARS)


def model(obj: Event, parent: str) -> str:
    return bounds.check_model(require_str(obj, "model", parent), f"{parent}.model")


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
    """Function tools: at most `bounds.MAX_TOOLS`, each with a valid name, a bounded
    description and a JSON Schema object of bounded size."""
    return [
        function_tool(raw, f"{param}[{index}]") for index, raw in enumerate(tool_list(value, param))
    ]


def tool_list(value: Any, param: str) -> list[Any]:
    """A `tools` array of at most `bounds.MAX_TOOLS` entries."""
    if not isinstance(value, list):
        raise invalid_value(param, f"Invalid type for '{param}': expected an array.")
    if len(value) > bounds.MAX_TOOLS:
        raise value_too_large(param, f"{bounds.MAX_TOOLS} tools")
    return value


def function_tool(raw: Any, where: str) -> common_pb2.ToolDefinition:
    """One function tool of a `tools` array; `where` names it (`session.tools[0]`)."""
    if not isinstance(raw, dict):
        raise invalid_value(where, f"Invalid type for '{where}': expected an object.")
    if raw.get("type", "function") != "function":
        raise InvalidRequest(
            f"Tool type {quote(raw.get('type'))} is not supported; use 'function' or 'mcp'.",
            code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
            param=f"{where}.type",
        )
    name = bounds.check_tool_name(require_str(raw, "name", where), f"{where}.name")
    description = raw.get("description") or ""
    parameters = raw.get("parameters") or {}
    if not isinstance(description, str):
        raise invalid_value(f"{where}.description", "Invalid type: expected a string.")
    bounds.check_chars(description, f"{where}.description", bounds.MAX_TOOL_DESCRIPTION_CHARS)
    if not isinstance(parameters, dict):
        raise invalid_value(f"{where}.parameters", "Invalid type: expected a JSON Schema object.")
    schema = bounds.check_serialized(
        parameters, f"{where}.parameters", bounds.MAX_TOOL_SCHEMA_BYTES
    )
    return common_pb2.ToolDefinition(
        name=name,
        description=description,
        parameters_json=schema,
        location=_C.TOOL_LOCATION_CLIENT,
    )


def tool_choice(value: Any, param: str) -> str:
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if isinstance(name, str):
            return bounds.check_tool_name(name, f"{param}.name")
    raise invalid_value(
        param,
        f"Invalid value for '{param}': expected 'auto', 'none', 'required' or "
        "{'type': 'function', 'name': ...}.",
    )
