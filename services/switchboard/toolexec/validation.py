"""Tool arguments: parsed from JSON text and checked against the tool's JSON Schema.

Only the subset of JSON Schema that Switchboard's tools use is supported: an
object schema with `properties`, `required` and `additionalProperties` (a
boolean), whose properties have a `type` of string, number, integer or
boolean, optionally with `enum` and, for strings, `minLength`/`maxLength`.
Annotations (`description`, `title`, `default`, `examples`) are allowed and
ignored. `check_schema` refuses anything else when a tool is registered, so a
tool can never declare a constraint that would silently go unchecked. A later
version may swap this module for the `jsonschema` library behind the same
three functions.

Error messages name the field and the rule, never the offending value (it may
be anything the model produced, and messages reach logs); they are written to
be given back to the model so it can correct the call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from switchboard.errors import SwitchboardError
from switchboard.v1 import common_pb2

_ANNOTATIONS = frozenset({"description", "title", "default", "examples"})
_OBJECT_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties"})
_PROPERTY_KEYWORDS = frozenset({"type", "enum", "minLength", "maxLength"})
_TYPES = frozenset({"string", "number", "integer", "boolean"})

# Field names come from the model; keep them, and their number, from bloating a message.
_MAX_NAME_CHARS = 64
_MAX_PROBLEMS = 5


class SchemaError(ValueError):
    """A tool's parameter schema is malformed or uses an unsupported keyword.

    Raised at registration: it is a programming error, never a call outcome.
    """


class InvalidArguments(SwitchboardError):
    """The arguments of a call cannot be used; the message says which field and why.

    Raised by `parse_arguments` and `validate`, and by executors for arguments
    that pass the schema but still make no sense (an unknown time zone). The
    message is shown to the model; `field` (also `param`) names the first bad field.
    """

    code = common_pb2.ERROR_CODE_TOOL_INVALID_ARGUMENTS

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, param=field)

    @property
    def field(self) -> str | None:
        return self.param


def check_schema(schema: Mapping[str, Any]) -> None:
    """Check that `schema` is an object schema within the supported subset.

    Raises:
        SchemaError: naming the keyword or property that is not supported.
    """
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        raise SchemaError('the parameters schema must have "type": "object"')
    _check_keywords(schema, _OBJECT_KEYWORDS, "the parameters schema")
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        raise SchemaError('"properties" must be an object')
    for name, prop in properties.items():
        _check_property(str(name), prop)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError('"required" must be a list of property names')
    for name in required:
        if name not in properties:
            raise SchemaError(f'"required" names {name!r}, which is not in "properties"')
    if not isinstance(schema.get("additionalProperties", True), bool):
        raise SchemaError('"additionalProperties" must be true or false')


def parse_arguments(text: str) -> dict[str, Any]:
    """Parse a call's arguments: JSON text that must hold an object.

    An empty (or all-whitespace) string means no arguments, `{}`: models send
    it for tools without parameters. `NaN` and `Infinity` are refused, as
    JSON does.

    Raises:
        InvalidArguments: the text is not JSON, nests too deeply, or is not an object.
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidArguments(
            f"The arguments are not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    except (ValueError, RecursionError):
        # A refused constant, an out-of-range number, or nesting deeper than
        # the decoder's recursion limit.
        raise InvalidArguments(
            "The arguments are not valid JSON (non-finite number or nesting too deep)."
        ) from None
    if not isinstance(value, dict):
        raise InvalidArguments(f"The arguments must be a JSON object, got {_kind(value)}.")
    return value


def validate(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Check parsed arguments against a schema that passed `check_schema`.

    Problems are reported in a stable order (missing required fields,
    unexpected fields, then each field's value in schema order), the first
    five in full and the rest counted.

    Raises:
        InvalidArguments: one sentence per problem; `field` is the first bad field.
    """
    properties: Mapping[str, Mapping[str, Any]] = schema.get("properties", {})
    problems: list[tuple[str, str]] = []
    for name in schema.get("required", []):
        if name not in arguments:
            problems.append((name, f"Missing required field {name!r}."))
    if schema.get("additionalProperties", True) is False:
        accepted = ", ".join(properties) or "no fields"
        for name in arguments:
            if name not in properties:
                shown = _short(name)
                problems.append(
                    (shown, f"Unexpected field {shown!r}; this tool accepts {accepted}.")
                )
    for name, prop in properties.items():
        if name in arguments:
            problem = _check_value(name, arguments[name], prop)
            if problem is not None:
                problems.append((name, problem))
    if problems:
        sentences = [text for _, text in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            sentences.append(f"And {len(problems) - _MAX_PROBLEMS} more problems.")
        raise InvalidArguments(" ".join(sentences), field=problems[0][0])


def _check_keywords(schema: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for keyword in schema:
        if keyword not in allowed and keyword not in _ANNOTATIONS:
            raise SchemaError(f"{where} uses {keyword!r}, which this validator does not support")


def _check_property(name: str, prop: Any) -> None:
    where = f"property {name!r}"
    if not isinstance(prop, Mapping):
        raise SchemaError(f"{where} must be a schema object")
    _check_keywords(prop, _PROPERTY_KEYWORDS, where)
    kind = prop.get("type")
    if kind not in _TYPES:
        raise SchemaError(f"{where} must have a type among {sorted(_TYPES)}")
    if "enum" in prop:
        enum = prop["enum"]
        if not isinstance(enum, list) or not enum:
            raise SchemaError(f"{where}: enum must be a non-empty list")
        for option in enum:
            if _type_problem(option, kind) is not None:
                raise SchemaError(f"{where}: enum option {option!r} is not a {kind}")
    for keyword in ("minLength", "maxLength"):
        if keyword in prop:
            bound = prop[keyword]
            if kind != "string":
                raise SchemaError(f"{where}: {keyword} applies to strings only")
            if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
                raise SchemaError(f"{where}: {keyword} must be a non-negative integer")
    if prop.get("minLength", 0) > prop.get("maxLength", math.inf):
        raise SchemaError(f"{where}: minLength is greater than maxLength")


def _check_value(name: str, value: Any, prop: Mapping[str, Any]) -> str | None:
    kind: str = prop["type"]
    problem = _type_problem(value, kind)
    if problem is not None:
        got = _kind(value)
        if kind == "integer" and got == "a number":
            got = "a number with a fraction"
        return f"Field {name!r} must be {problem}, got {got}."
    enum = prop.get("enum")
    if enum is not None and not any(_same(value, option) for option in enum):
        options = ", ".join(json.dumps(option) for option in enum)
        return f"Field {name!r} must be one of {options}."
    if kind == "string":
        low, high = prop.get("minLength"), prop.get("maxLength")
        if low is not None and len(value) < low:
            return f"Field {name!r} must be at least {low} characters long."
        if high is not None and len(value) > high:
            return f"Field {name!r} must be at most {high} characters long, got {len(value)}."
    return None


def _type_problem(value: Any, kind: str) -> str | None:
    """None when `value` is of JSON Schema type `kind`, else what it should be."""
    # bool is an int subclass in Python, but never a number in JSON.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return None if isinstance(value, str) else "a string"
    if kind == "boolean":
        return None if isinstance(value, bool) else "a boolean"
    if kind == "number":
        return None if is_number else "a number"
    # integer: JSON Schema counts 2.0 as an integer too.
    if is_number and (isinstance(value, int) or float(value).is_integer()):
        return None
    return "an integer"


def _same(value: Any, option: Any) -> bool:
    # JSON Schema equality: 1 equals 1.0, but true never equals 1.
    return isinstance(value, bool) == isinstance(option, bool) and bool(value == option)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS] + "…"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which no JSON encoder can give back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value
