"""What a tool is, and the registry that holds the tools a toolexec process serves.

A `Tool` is data plus one async function: its name and description (shown to
the model), the JSON Schema of its arguments, its timeout and concurrency
limit, and the executor that runs it. The `Registry` checks each tool when it
is registered and owns one `asyncio.Semaphore` per tool, so a tool's
`max_concurrency` holds across every tenant and call served by the process.

Executors receive arguments that already passed the schema. They return any
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
from switchboard.toolexec.validation import check_schema
from switchboard.v1 import common_pb2

# An executor takes the validated arguments and returns a JSON-able result.
Executor = Callable[[dict[str, Any]], Awaitable[Any]]

# The function-name rule of the OpenAI API, which every tool name must pass.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
        parameters: JSON Schema of the arguments, within the subset that
            `validation.check_schema` accepts.
        executor: `async (arguments) -> result`; the result must be JSON-serialisable.
        timeout_s: longest a call may take, including the wait for a free slot.
        max_concurrency: calls that may run at once in this process.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    executor: Executor = field(repr=False)
    timeout_s: float = 5.0
    max_concurrency: int = 16

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must match {_NAME.pattern}")
        if not self.timeout_s > 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0")
        if self.max_concurrency < 1:
            raise ValueError(f"tool {self.name!r}: max_concurrency must be >= 1")


class Registry:
    """The tools one toolexec process serves, each with its concurrency limit.

    Build it at start-up, register every tool, then hand it to the servicer;
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
            SchemaError: its parameter schema is outside the supported subset.
        """
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        check_schema(tool.parameters)
        self._tools[tool.name] = tool
        self._slots[tool.name] = asyncio.Semaphore(tool.max_concurrency)

    def get(self, name: str) -> Tool | None:
        """The tool registered under `name`, or None."""
        return self._tools.get(name)

    def list(self) -> tuple[Tool, ...]:
        """Every registered tool, sorted by name so listings are stable."""
        return tuple(sorted(self._tools.values(), key=lambda tool: tool.name))

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
