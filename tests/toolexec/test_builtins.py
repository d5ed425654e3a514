"""The built-in tools and the registry they live in: pure functions, no server."""

from __future__ import annotations

import time
from typing import Any

import pytest

from switchboard.toolexec.builtins import (
    BUILTIN_TOOLS,
    MAX_EXPRESSION_CHARS,
    builtin_registry,
    calculate,
    current_time,
    evaluate,
)
from switchboard.toolexec.registry import CallInfo, Registry, Tool
from switchboard.toolexec.validation import InvalidArguments, SchemaError, check_schema

CALL = CallInfo(tenant_id="acme", session_id="sess_1", call_id="call_1", tool="t")


async def nothing(arguments: dict[str, Any], call: CallInfo) -> None:
    return None


def tool(name: str = "t", **overrides: Any) -> Tool:
    fields: dict[str, Any] = {
        "name": name,
        "description": "d",
        "parameters": {"type": "object"},
        "executor": nothing,
    }
    fields.update(overrides)
    return Tool(**fields)


# --- calculate ------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("-2**2", -4),
        ("2**3**2", 512),
        ("(-2)**2", 4),
        ("--3", 3),
        ("+5", 5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("1 / 4", 0.25),
        ("2 ** -1", 0.5),
        ("1_000 * 2", 2000),
        ("1e3", 1000.0),
        ("  3  ", 3),
        ("((((((1))))))", 1),
        ("10**1000 // 10**999", 10),
        ("1**99999999", 1),
    ],
)
def test_evaluate(expression: str, expected: float) -> None:
    result = evaluate(expression)
    assert result == expected
    assert type(result) is type(expected)


def test_evaluate_floats() -> None:
    assert evaluate("0.1 + 0.2") == pytest.approx(0.3)
    assert evaluate("2 ** 0.5") == pytest.approx(1.41421356)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("__import__('os')", "found a function call"),
        ("__import__('os').system('true')", "found a function call"),
        ("os", "found a name"),
        ("__builtins__", "found a name"),
        ("abs(-1)", "found a function call"),
        ("eval('1')", "found a function call"),
        ("().__class__", "found an attribute"),
        ("()", "found an unsupported element (Tuple)"),
        ("(1).real", "found an attribute"),
        ("'a' * 3", "found a constant that is not a number"),
        ("True + 1", "found a constant that is not a number"),
        ("None", "found a constant that is not a number"),
        ("1j", "found a constant that is not a number"),
        ("[1, 2]", "unsupported element (List)"),
        ("1 if 1 else 2", "unsupported element (IfExp)"),
        ("1 < 2", "unsupported element (Compare)"),
        ("lambda: 1", "unsupported element (Lambda)"),
        ("1 << 3", "found an unsupported operator"),
        ("1 & 1", "found an unsupported operator"),
        ("~1", "found an unsupported operator"),
        ("not 1", "found an unsupported operator"),
        ("x := 1", "is not an arithmetic expression"),
        ("1 +", "is not an arithmetic expression"),
        ("1; 2", "is not an arithmetic expression"),
        ("import os", "is not an arithmetic expression"),
        ("", "is not an arithmetic expression"),
        ("1\x00", "is not an arithmetic expression"),
        ("'\\d'", "not"),
        ("(" * 200 + "1" + ")" * 200, "longer than"),
        ("2**99999999", "too large"),
        ("9**9**9", "too large"),
        ("2**4097", "too large"),
        ("3**4096", "too large"),
        ("(2**4000) * (2**4000)", "too large"),
        ("10.0**400", "too large"),
        ("1e309", "too large"),
        ("1e308 * 10", "too large"),
        ("(2**4000) / 3", "too large"),
        ("1 / 0", "divides by zero"),
        ("1 // 0", "divides by zero"),
        ("1 % 0.0", "divides by zero"),
        ("0 ** -1", "divides by zero"),
        ("(-8) ** 0.5", "not a real number"),
    ],
)
def test_evaluate_refuses(expression: str, expected: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidArguments) as info:
        evaluate(expression)
    # Refused before doing the work, not after seconds of it.
    assert time.perf_counter() - started < 0.1
    assert info.value.field == "expression"
    assert info.value.message.startswith("Field 'expression' ")
    assert expected in info.value.message


def test_expression_length_is_bounded() -> None:
    assert evaluate("1" + " " * (MAX_EXPRESSION_CHARS - 1)) == 1
    with pytest.raises(InvalidArguments, match="longer than"):
        evaluate("1" + " " * MAX_EXPRESSION_CHARS)


async def test_calculate_returns_a_result_object() -> None:
    assert await calculate({"expression": "6 * 7"}, CALL) == {"result": 42}


# --- current_time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "clock", "expected"),
    [
        ({}, 0.0, {"timezone": "UTC", "iso8601": "1970-01-01T00:00:00+00:00", "unix": 0}),
        (
            {"timezone": "Asia/Kolkata"},
            0.9,
            {"timezone": "Asia/Kolkata", "iso8601": "1970-01-01T05:30:00+05:30", "unix": 0},
        ),
        (
            # 2024-07-01T12:00:00Z: Paris is on summer time.
            {"timezone": "Europe/Paris"},
            1_719_835_200.0,
            {
                "timezone": "Europe/Paris",
                "iso8601": "2024-07-01T14:00:00+02:00",
                "unix": 1_719_835_200,
            },
        ),
        (
            {"timezone": "America/New_York"},
            1_704_110_400.0,
            {
                "timezone": "America/New_York",
                "iso8601": "2024-01-01T07:00:00-05:00",
                "unix": 1_704_110_400,
            },
        ),
    ],
)
async def test_current_time(arguments: dict[str, Any], clock: float, expected: Any) -> None:
    assert await current_time(arguments, CALL, clock=lambda: clock) == expected


async def test_current_time_uses_the_real_clock_by_default() -> None:
    result = await current_time({}, CALL)
    assert abs(result["unix"] - time.time()) < 5


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "utc", "Europe", "../etc/passwd", "/etc/passwd", "zone.tab", "a\x00"]
)
async def test_current_time_refuses_unknown_zones(name: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        await current_time({"timezone": name}, CALL)
    assert info.value.field == "timezone"
    assert info.value.message == (
        "Field 'timezone' must be an IANA time zone name such as 'Europe/Paris' or 'UTC'."
    )


# --- the registry ---------------------------------------------------------


def test_builtin_schemas_are_supported_and_registered() -> None:
    for builtin in BUILTIN_TOOLS:
        check_schema(builtin.parameters)
    registry = builtin_registry()
    assert [t.name for t in registry.list()] == ["calculate", "current_time"]
    assert registry.get("calculate") is not None
    assert registry.get("nope") is None
    assert "current_time" in registry
    assert len(registry) == 2


def test_registry_lists_sorted_and_owns_a_semaphore_per_tool() -> None:
    registry = Registry([tool("b", max_concurrency=3), tool("a")])
    assert [t.name for t in registry.list()] == ["a", "b"]
    assert registry.semaphore("b") is registry.semaphore("b")
    assert registry.semaphore("a") is not registry.semaphore("b")
    with pytest.raises(KeyError):
        registry.semaphore("c")


def test_registry_refuses_duplicates() -> None:
    registry = Registry([tool("a")])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(tool("a"))
    assert registry.names() == {"a"}


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "array"},
        {"type": "object", "anyOf": []},
        {"type": "object", "properties": {"a": {"type": "strin"}}},
    ],
)
def test_a_tool_refuses_a_bad_schema_when_built(parameters: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        tool("b", parameters=parameters)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "has space"}, "must match"),
        ({"name": ""}, "must match"),
        ({"name": "x" * 65}, "must match"),
        ({"name": "ok\n"}, "must match"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_tool_checks_its_fields(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        tool(**overrides)
