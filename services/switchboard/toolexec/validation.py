"""Tool arguments: parsed from JSON text and checked against the tool's JSON Schema.

Schemas are JSON Schema Draft 2020-12, checked by the `jsonschema` library:
`ArgumentsSchema(schema)` checks the schema itself once (when a tool is built
or a tools file is loaded) and then validates any number of calls. The top
level must be an object schema, as for OpenAI function parameters; `$ref`
may only point inside the schema (`#...`), so validating never fetches
anything. `format` is an annotation, as the specification says, not checked.

Error messages name the field by its path (`items[2].sku`) and the rule,
never the offending value (it may be anything the model produced, and
messages reach logs); they are written to be given back to the model so it
can correct the call. Schema values (an `enum`'s options, a `pattern`) may be
quoted: they come from the tool's author, not the call.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema
import referencing.exceptions

from switchboard.errors import SwitchboardError
from switchboard.key_paths import format_path
from switchboard.v1 import common_pb2

# Field names come from the model; keep them, and their number, from bloating a message.
_MAX_FIELD_CHARS = 96
_MAX_PROBLEMS = 5
# Schema values quoted in a message (enum options, patterns) are cut here.
_MAX_QUOTE_CHARS = 120
_KINDS = {
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}
_BOUNDS = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
}
_REF_KEYWORDS = ("$ref", "$dynamicRef")


class SchemaError(ValueError):
    """A tool's parameter schema is not a valid Draft 2020-12 object schema.

    Raised when a tool is built or a tools file is loaded, never for a call.

    Attributes:
        path: where in the schema the problem is, as keys and indexes.
        problem: what is wrong there.
    """

    def __init__(self, problem: str, path: Sequence[str | int] = ()) -> None:
        self.path = tuple(path)
        self.problem = problem
        where = format_path(self.path)
        super().__init__(f"{where}: {problem}" if where else problem)


class InvalidArguments(SwitchboardError):
    """The arguments of a call cannot be used; the message says which field and why.

    Raised by `parse_arguments` and `ArgumentsSchema.validate`, and by executors
    for arguments that pass the schema but still make no sense (an unknown time
    zone). The message is shown to the model; `field` (also `param`) is the
    path of the first bad field.
    """

    code = common_pb2.ERROR_CODE_TOOL_INVALID_ARGUMENTS

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, param=field)

    @property
    def field(self) -> str | None:
        return self.param


class ArgumentsSchema:
    """A checked parameter schema, ready to validate calls.

    Raises:
        SchemaError: (at construction) the schema is not a Draft 2020-12 schema,
            its top level is not `"type": "object"`, or it has a `$ref` that
            points outside itself.
    """

    __slots__ = ("_validator",)

    def __init__(self, schema: Mapping[str, Any]) -> None:
        check_schema(schema)
        self._validator = jsonschema.Draft202012Validator(schema)

    def validate(self, arguments: Mapping[str, Any]) -> None:
        """Check parsed arguments against the schema.

        Problems are reported in a stable order (missing required fields,
        unexpected fields, then the others by path), the first five in full
        and the rest counted.

        Raises:
            InvalidArguments: one sentence per problem; `field` is the first bad field.
        """
        try:
            errors = list(self._validator.iter_errors(arguments))
        except RecursionError:
            raise InvalidArguments("The arguments nest too deeply.") from None
        except referencing.exceptions.Unresolvable:
            # check_schema refuses remote references; a local one that points
            # nowhere is the tool author's bug, reported without detail.
            raise InvalidArguments("The tool's parameter schema cannot be applied.") from None
        if not errors:
            return
        problems: dict[str, tuple[int, str, str]] = {}
        for error in errors:
            for rank, field, sentence in _describe(error):
                problems.setdefault(sentence, (rank, field, sentence))
        ordered = sorted(problems.values(), key=lambda p: (p[0], p[1]))
        sentences = [sentence for _, _, sentence in ordered[:_MAX_PROBLEMS]]
        if len(ordered) > _MAX_PROBLEMS:
            sentences.append(f"And {len(ordered) - _MAX_PROBLEMS} more problems.")
        raise InvalidArguments(" ".join(sentences), field=ordered[0][1] or None)


def check_schema(schema: Mapping[str, Any]) -> None:
    """Check that `schema` is a Draft 2020-12 object schema with local references only.

    Raises:
        SchemaError: naming the path inside the schema and the problem.
    """
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        raise SchemaError('the parameters schema must have "type": "object"')
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(_cut(exc.message), list(exc.absolute_path)) from None
    for path, keyword, target in _references(schema, ()):
        if not isinstance(target, str) or not target.startswith("#"):
            raise SchemaError(f"{keyword} must point inside the schema (start with '#')", path)


def validate(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """`ArgumentsSchema(schema).validate(arguments)`, for one-off checks."""
    ArgumentsSchema(schema).validate(arguments)


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
        value = parse_json(text)
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


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: `NaN`, `Infinity` and numbers beyond the float range are refused.

    Raises:
        ValueError: (json.JSONDecodeError included) the text is not such JSON.
        RecursionError: it nests deeper than the decoder can follow.
    """
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _describe(error: Any) -> Iterator[tuple[int, str, str]]:
    """(rank, field, sentence) for one jsonschema error; ranks order the report."""
    path = list(error.absolute_path)
    field = _field(path)
    keyword: str | None = error.validator
    rule: Any = error.validator_value
    instance: Any = error.instance
    subject = f"Field {field!r}" if field else "The arguments"
    if keyword == "required" and isinstance(instance, Mapping):
        for name in rule:
            if name not in instance:
                missing = _field([*path, name])
                yield 0, missing, f"Missing required field {missing!r}."
        return
    if keyword == "additionalProperties" and isinstance(instance, Mapping):
        schema: Mapping[str, Any] = error.schema
        declared = schema.get("properties", {})
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        accepted = ", ".join(declared) or "no fields"
        owner = "this tool" if not field else f"field {field!r}"
        for name in instance:
            if name in declared or any(p.search(name) for p in patterns):
                continue
            extra = _field([*path, name])
            yield 1, extra, f"Unexpected field {extra!r}; {owner} accepts {accepted}."
        return
    yield 2, field, f"{subject} {_rule(keyword, rule, instance)}."


def _rule(keyword: str | None, rule: Any, instance: Any) -> str:
    """What `instance` should be, by the keyword it failed, without quoting it."""
    if keyword == "type":
        wanted = rule if isinstance(rule, list) else [rule]
        got = _kind(instance)
        if "integer" in wanted and got == "a number":
            got = "a number with a fraction"
        return f"must be {' or '.join(_KINDS.get(w, str(w)) for w in wanted)}, got {got}"
    if keyword == "enum":
        return f"must be one of {_cut(', '.join(_json(option) for option in rule))}"
    if keyword == "const":
        return f"must be {_cut(_json(rule))}"
    if keyword in _BOUNDS:
        return f"must be {_BOUNDS[keyword]} {_json(rule)}"
    if keyword == "multipleOf":
        return f"must be a multiple of {_json(rule)}"
    if keyword == "minLength":
        return f"must be at least {_count(rule, 'character')} long"
    if keyword == "maxLength":
        return f"must be at most {_count(rule, 'character')} long, got {len(instance)}"
    if keyword == "pattern":
        return f"must match the pattern {_cut(str(rule))!r}"
    if keyword == "minItems":
        return f"must have at least {_count(rule, 'item')}"
    if keyword == "maxItems":
        return f"must have at most {_count(rule, 'item')}"
    if keyword == "uniqueItems":
        return "must not contain duplicate items"
    if keyword == "minProperties":
        return f"must have at least {_count(rule, 'field')}"
    if keyword == "maxProperties":
        return f"must have at most {_count(rule, 'field')}"
    if keyword in ("anyOf", "oneOf"):
        exactly = "exactly one" if keyword == "oneOf" else "one"
        return f"must match {exactly} of the allowed forms"
    if keyword == "not":
        return "has a form that is not allowed"
    if keyword == "dependentRequired":
        return "is missing fields that its other fields require"
    if keyword in ("unevaluatedProperties", "propertyNames"):
        return "has fields that are not allowed"
    if keyword is None or keyword == "false":
        return "is not allowed"
    return f"does not satisfy the schema's {keyword!r} rule"


def _references(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[Any, str, Any]]:
    """(path, keyword, target) of every `$ref` / `$dynamicRef` in a schema."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            if key in _REF_KEYWORDS:
                yield (*path, key), key, child
            else:
                yield from _references(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _references(child, (*path, index))


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


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_QUOTE_CHARS else text[:_MAX_QUOTE_CHARS] + "…"


def _field(path: Sequence[str | int]) -> str:
    """The path of a field as messages show it, cut so a huge name cannot bloat them."""
    text = format_path(path)
    return text if len(text) <= _MAX_FIELD_CHARS else text[:_MAX_FIELD_CHARS] + "…"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which no JSON encoder can give back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value
