"""Arguments parsing and JSON Schema (Draft 2020-12) validation: pure functions, no server."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.toolexec.validation import (
    ArgumentsSchema,
    InvalidArguments,
    SchemaError,
    check_schema,
    parse_arguments,
    validate,
)
from switchboard.v1 import common_pb2

SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "annotations are allowed",
    "properties": {
        "city": {"type": "string", "minLength": 2, "maxLength": 10},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer"},
        "ratio": {"type": "number"},
        "metric": {"type": "boolean"},
        "level": {"type": "integer", "enum": [1, 2]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def problem(arguments: dict[str, Any], schema: dict[str, Any] = SCHEMA) -> InvalidArguments:
    with pytest.raises(InvalidArguments) as info:
        validate(arguments, schema)
    assert info.value.code == common_pb2.ERROR_CODE_TOOL_INVALID_ARGUMENTS
    return info.value


def test_the_example_schema_is_supported() -> None:
    check_schema(SCHEMA)


def test_valid_arguments_pass() -> None:
    validate({"city": "Paris", "days": 3}, SCHEMA)
    validate(
        {"city": "Oslo", "days": 2.0, "unit": "f", "ratio": 0.5, "metric": False, "level": 2},
        SCHEMA,
    )


def test_missing_required_field_is_named() -> None:
    exc = problem({"city": "Paris"})
    assert exc.field == "days"
    assert exc.message == "Missing required field 'days'."


def test_unexpected_field_is_named_with_the_accepted_ones() -> None:
    exc = problem({"city": "Paris", "days": 1, "color": "red"})
    assert exc.field == "color"
    assert "Unexpected field 'color'" in exc.message
    assert "city, unit, days, ratio, metric, level" in exc.message


def test_additional_properties_are_allowed_unless_refused() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    validate({"a": "x", "b": 1}, schema)


@pytest.mark.parametrize(
    ("arguments", "field", "expected"),
    [
        ({"city": 5, "days": 1}, "city", "Field 'city' must be a string, got a number."),
        ({"city": "Rome", "days": "3"}, "days", "Field 'days' must be an integer, got a string."),
        (
            {"city": "Rome", "days": 1.5},
            "days",
            "Field 'days' must be an integer, got a number with a fraction.",
        ),
        ({"city": "Rome", "days": True}, "days", "Field 'days' must be an integer, got a boolean."),
        ({"city": "Rome", "days": 1, "ratio": None}, "ratio", "must be a number, got null."),
        ({"city": "Rome", "days": 1, "ratio": False}, "ratio", "must be a number, got a boolean."),
        ({"city": "Rome", "days": 1, "metric": 1}, "metric", "must be a boolean, got a number."),
        ({"city": ["R"], "days": 1}, "city", "must be a string, got an array."),
        ({"city": {}, "days": 1}, "city", "must be a string, got an object."),
        ({"city": "Rome", "days": 1, "unit": "k"}, "unit", 'must be one of "c", "f".'),
        ({"city": "R", "days": 1}, "city", "must be at least 2 characters long."),
        ({"city": "R" * 11, "days": 1}, "city", "must be at most 10 characters long, got 11."),
    ],
)
def test_each_rule_names_the_field(arguments: dict[str, Any], field: str, expected: str) -> None:
    exc = problem(arguments)
    assert exc.field == field
    assert exc.message.endswith(expected)


def test_enum_follows_json_equality() -> None:
    validate({"city": "Rome", "days": 1, "level": 2.0}, SCHEMA)
    # true == 1 in Python, never in JSON Schema.
    assert problem({"city": "Rome", "days": 1, "level": True}).field == "level"


def test_every_problem_is_reported_first_field_first() -> None:
    exc = problem({"days": "x", "extra": 1})
    assert exc.field == "city"
    assert "Missing required field 'city'." in exc.message
    assert "Unexpected field 'extra'" in exc.message
    assert "Field 'days' must be an integer" in exc.message


def test_messages_never_quote_a_value() -> None:
    exc = problem({"city": "hunter2-secret", "days": "hunter2-secret", "unit": "hunter2-secret"})
    assert "hunter2" not in exc.message


def test_many_problems_are_counted_not_listed() -> None:
    exc = problem({"city": "Rome", "days": 1, **{f"x{i}": 1 for i in range(1000)}})
    assert exc.message.count("Unexpected field") == 5
    assert exc.message.endswith("And 995 more problems.")


def test_a_huge_field_name_is_shortened() -> None:
    exc = problem({"city": "Rome", "days": 1, "x" * 10_000: 1})
    assert len(exc.message) < 300


# Webhook schemas are arbitrary: nested objects, arrays, patterns, bounds, anyOf, $defs.
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ord_[0-9]+$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/$defs/item"},
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "tags": {"type": "array", "uniqueItems": True, "maxItems": 2},
    },
    "required": ["order_id", "items"],
    "additionalProperties": False,
    "$defs": {
        "item": {
            "type": "object",
            "properties": {
                "sku": {"type": "string"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            },
            "required": ["sku"],
            "additionalProperties": False,
        }
    },
}


@pytest.mark.parametrize(
    ("arguments", "field", "expected"),
    [
        (
            {"order_id": "ord_1", "items": [{"sku": "a"}, {"qty": 2}]},
            "items[1].sku",
            "Missing required field 'items[1].sku'.",
        ),
        (
            {"order_id": "ord_1", "items": [{"sku": "a", "qty": 0}]},
            "items[0].qty",
            "Field 'items[0].qty' must be >= 1.",
        ),
        (
            {"order_id": "ord_1", "items": [{"sku": "a", "qty": 100}]},
            "items[0].qty",
            "Field 'items[0].qty' must be <= 99.",
        ),
        (
            {"order_id": "ord_1", "items": [{"sku": "a", "color": "red"}]},
            "items[0].color",
            "Unexpected field 'items[0].color'; field 'items[0]' accepts sku, qty.",
        ),
        (
            {"order_id": "nope", "items": [{"sku": "a"}]},
            "order_id",
            "Field 'order_id' must match the pattern '^ord_[0-9]+$'.",
        ),
        ({"order_id": "ord_1", "items": []}, "items", "Field 'items' must have at least 1 item."),
        (
            {"order_id": "ord_1", "items": [{"sku": "a"}], "note": 5},
            "note",
            "Field 'note' must match one of the allowed forms.",
        ),
        (
            {"order_id": "ord_1", "items": [{"sku": "a"}], "tags": ["x", "x"]},
            "tags",
            "Field 'tags' must not contain duplicate items.",
        ),
        (
            {"order_id": "ord_1", "items": [{"sku": 7}]},
            "items[0].sku",
            "Field 'items[0].sku' must be a string, got a number.",
        ),
    ],
)
def test_nested_problems_name_the_json_path(
    arguments: dict[str, Any], field: str, expected: str
) -> None:
    exc = problem(arguments, ORDER_SCHEMA)
    assert exc.field == field
    assert exc.message == expected


def test_a_valid_nested_call_passes() -> None:
    schema = ArgumentsSchema(ORDER_SCHEMA)
    schema.validate({"order_id": "ord_42", "items": [{"sku": "a", "qty": 3}], "note": None})


def test_nested_messages_never_quote_a_value() -> None:
    secret = "hunter2-secret"
    exc = problem(
        {"order_id": secret, "items": [{"sku": secret, "qty": secret}], "note": [secret]},
        ORDER_SCHEMA,
    )
    assert secret not in exc.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("  \n", {}),
        ('{"s": "é", "n": [1, 2.5]}', {"s": "é", "n": [1, 2.5]}),
    ],
)
def test_parse_arguments(text: str, expected: dict[str, Any]) -> None:
    assert parse_arguments(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"a": 1',
            "The arguments are not valid JSON: Expecting ',' delimiter at line 1 column 8.",
        ),
        ("[1, 2]", "The arguments must be a JSON object, got an array."),
        ('"text"', "The arguments must be a JSON object, got a string."),
        ("null", "The arguments must be a JSON object, got null."),
        ('{"a": NaN}', "not valid JSON"),
        ('{"a": -Infinity}', "not valid JSON"),
        ('{"a": 1e400}', "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_parse_arguments_refuses(text: str, expected: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        parse_arguments(text)
    assert expected in info.value.message


@pytest.mark.parametrize(
    ("schema", "path", "expected"),
    [
        ({"type": "array"}, (), '"type": "object"'),
        ({"properties": {}}, (), '"type": "object"'),
        ({"type": "object", "oneOf": []}, ("oneOf",), "should be non-empty"),
        ({"type": "object", "properties": []}, ("properties",), "is not of type 'object'"),
        ({"type": "object", "properties": {"a": "string"}}, ("properties", "a"), "not of type"),
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            ("properties", "a", "type"),
            "is not valid",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}},
            ("properties", "a", "maxLength"),
            "less than the minimum of 0",
        ),
        ({"type": "object", "required": "a"}, ("required",), "is not of type 'array'"),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
            ("properties", "a", "$ref"),
            "must point inside the schema",
        ),
    ],
)
def test_check_schema_names_the_path_of_the_problem(
    schema: Any, path: tuple[str | int, ...], expected: str
) -> None:
    with pytest.raises(SchemaError) as info:
        check_schema(schema)
    assert info.value.path == path
    assert expected in info.value.problem


def test_a_reference_that_points_nowhere_is_refused_per_call_not_crashed() -> None:
    schema = ArgumentsSchema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(InvalidArguments, match="cannot be applied"):
        schema.validate({"a": 1})


def test_deep_nesting_is_refused_not_crashed() -> None:
    schema = ArgumentsSchema({"type": "object", "properties": {"a": {"$ref": "#"}}})
    deep: dict[str, Any] = {}
    for _ in range(5000):
        deep = {"a": deep}
    with pytest.raises(InvalidArguments, match="nest too deeply"):
        schema.validate(deep)
