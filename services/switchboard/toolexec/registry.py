"""What a tool is, and the registry of the built-in tools a toolexec process serves.

A `Tool` is data plus one async function: its name and description (shown to
the model), the JSON Schema of its arguments (checked when the `Tool` is
built), its timeout and concurrency limit, and the executor that runs it. The
`Registry` owns one `asyncio.Semaphore` per tool, so a built-in's
`max_concurrency` holds across every tenant and call served by the process
(webhook tools get theirs from `catalog.WebhookSlots`).

Executors receive arguments that already passed the schema, and the
`CallInfo` of the call (tenant, session, call id): a tool that touches
tenant data must scope it to `call.tenant_id`. They return any
JSON-serialisable value, raise `InvalidArguments` (from
`switchboard.toolexec.validation`) for arguments the schema cannot rule out,
and `ToolFailed` for expected failures; both messages are given to the model.
Any other exception is a bug: the model is told only that the tool failed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from switchboard.errors import SwitchboardError
from switchboard.toolexec.validation import ArgumentsSchema
from switchboard.v1 import common_pb2

# The function-name rule of the OpenAI API, which every tool name must pass.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who is calling: given to every executor with the arguments.

    Attributes:
        tenant_id: the tenant the call runs for; scope any data access to it.
        session_id: the conversation, for logs.
        call_id: the model's function call id ("" when the caller sent none);
            retries of one call share it.
        tool: the name of the tool called.
    """

    tenant_id: str
    session_id: str
    call_id: str
    tool: str


# An executor takes the validated arguments and the call, and returns a JSON-able result.
Executor = Callable[[dict[str, Any], CallInfo], Awaitable[Any]]


class ToolFailed(SwitchboardError):
    """An expected failure of a tool; the message is given to the model.

    Never put secrets or argument values in the message: it reaches the model,
    the client and the logs.
    """

    code = common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED


@dataclass(frozen=True, slots=True)
class Tool:
    """A server-side function tool.

    Attributes:
        name: unique name the model calls it by (letters, digits, `_`, `-`; at most 64).
        description: what it does, written for the model.
        parameters: JSON Schema (Draft 2020-12) of the arguments, an object
            schema; checked when the tool is built.
        executor: `async (arguments, call) -> result`; the result must be
            JSON-serialisable.
        timeout_s: longest a call may take, including the wait for a free slot.
        max_concurrency: calls that may run at once in this process.
        schema: the checked `parameters`, which validates calls (derived).

    Raises:
        ValueError: a bad name, timeout or concurrency limit.
        SchemaError: `parameters` is not a valid object schema.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    executor: Executor = field(repr=False)
    timeout_s: float = 5.0
    max_concurrency: int = 16
    schema: ArgumentsSchema = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not TOOL_NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must match {TOOL_NAME.pattern}")
        if not self.timeout_s > 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0")
        if self.max_concurrency < 1:
            raise ValueError(f"tool {self.name!r}: max_concurrency must be >= 1")
        # Compiled once here, not per call; the dataclass is frozen.
        object.__setattr__(self, "schema", ArgumentsSchema(self.parameters))


class Registry:
    """The built-in tools one toolexec process serves, each with its concurrency limit.

    Build it at start-up, register every tool, then build the `Catalog` from it;
    it is not meant to change while serving. Semaphores bind to the event loop
    that first waits on them, so use one registry per loop.
    """

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add a tool.

        Raises:
            ValueError: a tool with that name is already registered.
        """
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        self._slots[tool.name] = asyncio.Semaphore(tool.max_concurrency)

    def get(self, name: str) -> Tool | None:
        """The tool registered under `name`, or None."""
        return self._tools.get(name)

    def list(self) -> tuple[Tool, ...]:
        """Every registered tool, sorted by name so listings are stable."""
        return tuple(sorted(self._tools.values(), key=lambda tool: tool.name))

    def names(self) -> frozenset[str]:
        """The names of every registered tool."""
        return frozenset(self._tools)

    def semaphore(self, name: str) -> asyncio.Semaphore:
        """The semaphore that enforces the tool's `max_concurrency`.

        Raises:
            KeyError: no tool is registered under `name`.
        """
        return self._slots[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)
