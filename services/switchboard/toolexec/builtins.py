"""The tools shipped with Switchboard, written as examples of how to add one.

A tool is three things: an async executor that takes the validated arguments
and the `CallInfo` of the call and returns a JSON-able value, a JSON Schema
of those arguments, and a `Tool` that ties them together with a description
for the model, a timeout and a concurrency limit. Register it in
`BUILTIN_TOOLS` (or in your own `Registry`) and it is listed and callable.
docs/toolexec.md walks through it.

- `calculate`: exact arithmetic on an expression, evaluated from its syntax
  tree with a whitelist of node types. Nothing is ever passed to
  `eval`/`exec`, names and calls do not exist, and sizes are bounded, so an
  expression cannot reach Python or exhaust memory.
- `current_time`: the current time in an IANA time zone.
"""

from __future__ import annotations

import ast
import math
import operator
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from switchboard.toolexec.registry import CallInfo, Registry, Tool
from switchboard.toolexec.validation import InvalidArguments

Number = int | float

# Longer input is refused before parsing: the parser's cost and nesting depth
# (and so the evaluator's recursion) grow with it.
MAX_EXPRESSION_CHARS = 256
# Integers stay below 2**4096 (about 1,233 digits): big enough for any
# arithmetic a model needs, small enough that every step is microseconds.
MAX_INT_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_ALLOWED = "numbers, + - * / // % ** and parentheses"


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression safely.

    Accepts int and float literals, `+ - * / // % **`, unary `-`/`+` and
    parentheses, with Python's precedence (`-2**2` is -4, `2**3**2` is 512).
    The text is parsed with `ast.parse` and walked node by node; any other node
    (a name, a call, an attribute, a string, a comparison, ...) is refused.

    Raises:
        InvalidArguments: (field `expression`) the text is too long, not an
            expression, uses anything else, divides by zero, or has a result
            that is too large or not a real number.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _invalid(f"is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        # Ignore (rather than print) the parser's warnings about odd string
        # literals: they would be refused below anyway.
        with warnings.catch_warnings(action="ignore"):
            tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise _invalid(f"is not an arithmetic expression; use {_ALLOWED}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise _invalid("divides by zero") from None
    except OverflowError:
        raise _invalid("has a result too large to represent") from None


async def calculate(arguments: dict[str, Any], call: CallInfo) -> dict[str, Number]:
    """Executor of the `calculate` tool: `{"expression": str}` -> `{"result": number}`.

    It runs on the event loop rather than in a thread: `evaluate`'s bounds keep
    every call to microseconds, cheaper than a thread hop.
    """
    return {"result": evaluate(arguments["expression"])}


async def current_time(
    arguments: dict[str, Any], call: CallInfo, *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """Executor of `current_time`: `{"timezone"?: str}` -> `{"timezone", "iso8601", "unix"}`.

    `timezone` is an IANA name (`Europe/Paris`), UTC when omitted. `iso8601` is
    the local time with its UTC offset, to the second; `unix` is whole seconds
    since the epoch. `clock` exists for tests.

    Raises:
        InvalidArguments: (field `timezone`) the name is not a known time zone.
    """
    name: str = arguments.get("timezone", "UTC")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError covers keys that are not normalised relative paths or
        # name a file that is not a zone; neither is a time zone name.
        raise InvalidArguments(
            "Field 'timezone' must be an IANA time zone name such as 'Europe/Paris' or 'UTC'.",
            field="timezone",
        ) from None
    now = clock()
    local = datetime.fromtimestamp(now, zone)
    return {
        "timezone": name,
        "iso8601": local.isoformat(timespec="seconds"),
        "unix": math.floor(now),
    }


CALCULATE = Tool(
    name="calculate",
    description=(
        "Evaluate an arithmetic expression exactly, for example '(2 + 3) * 4 / 7' or "
        "'2 ** 10 % 7'. Supports numbers, + - * / // % ** and parentheses; no variables "
        'or functions. Returns {"result": number}.'
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "The arithmetic expression to evaluate.",
                "minLength": 1,
                "maxLength": MAX_EXPRESSION_CHARS,
            },
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
    executor=calculate,
    timeout_s=1.0,
    max_concurrency=64,
)

CURRENT_TIME = Tool(
    name="current_time",
    description=(
        'Get the current date and time. Returns {"timezone", "iso8601", "unix"}: '
        "the local time with its UTC offset and the Unix time in seconds."
    ),
    parameters={
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "IANA time zone name, e.g. 'Europe/Paris'. Defaults to 'UTC'.",
                "minLength": 1,
                "maxLength": 64,
            },
        },
        "additionalProperties": False,
    },
    executor=current_time,
    timeout_s=1.0,
    max_concurrency=64,
)

BUILTIN_TOOLS: tuple[Tool, ...] = (CALCULATE, CURRENT_TIME)


def builtin_registry() -> Registry:
    """A new registry holding every built-in tool."""
    return Registry(BUILTIN_TOOLS)


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        # type() rather than isinstance(): bool is an int, and complex is refused.
        if type(node.value) in (int, float):
            return _bounded(node.value)
        raise _invalid(f"may only contain {_ALLOWED}; found a constant that is not a number")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    raise _invalid(f"may only contain {_ALLOWED}; found {_describe(node)}")


def _check_power(base: Number, exponent: Number) -> None:
    # Refuse int ** int before computing it: 2**99999999 would take seconds
    # and megabytes. The result has more than (bits(base) - 1) * exponent bits.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise _invalid("has a result too large to represent")


def _bounded(value: Any) -> Number:
    if isinstance(value, complex):
        # A negative number to a fractional power, e.g. (-8) ** (1/3).
        raise _invalid("has a result that is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid("has a result too large to represent")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _invalid("has a result too large to represent")
    result: Number = value
    return result


def _describe(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return "a name"
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return "an attribute"
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return "an unsupported operator"
    return f"an unsupported element ({type(node).__name__})"


def _invalid(problem: str) -> InvalidArguments:
    return InvalidArguments(f"Field 'expression' {problem}.", field="expression")
