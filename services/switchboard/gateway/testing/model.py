"""Scripted model calls: what the fake broker streams (see the package docstring)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from switchboard.errors import SwitchboardError, code_from_name
from switchboard.v1 import broker_pb2, common_pb2


@dataclass(frozen=True, slots=True)
class Text:
    """A text delta."""

    text: str


@dataclass(frozen=True, slots=True)
class Call:
    """A fragment of function call `index` (the first carries its id and name)."""

    index: int
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The call ends: `reason` is a `broker_pb2.FinishReason` name's tail."""

    reason: str = "stop"
    input_tokens: int = 10
    output_tokens: int = 5


@dataclass(frozen=True, slots=True)
class Fail:
    """The call fails with error code `code` (a catalogue name)."""

    code: str
    message: str = "scripted failure"


@dataclass(frozen=True, slots=True)
class Wait:
    """The call stands still until the test sets `event`."""

    event: asyncio.Event


Step = Text | Call | Finish | Fail | Wait


@dataclass
class Script:
    """One model call's stream, and the broker it names itself by."""

    steps: list[Step]
    broker: str = "broker-a:50052"


def reply(*texts: str, reason: str = "stop") -> Script:
    """A call that streams `texts` as deltas and finishes."""
    return Script([*(Text(text) for text in texts), Finish(reason)])


def _fail(step: Fail) -> SwitchboardError:
    code = code_from_name(step.code)
    if code is None:
        raise ValueError(f"unknown error code {step.code!r}")
    return SwitchboardError(step.message, code=code)


class ScriptedCall:
    """A `ModelCall` that plays a `Script`."""

    def __init__(self, script: Script, model: ScriptedModel, response_id: str) -> None:
        self.script = script
        self.model = model
        self.response_id = response_id
        self.cancelled = False

    async def broker(self) -> str:
        return self.script.broker

    async def __aiter__(self) -> AsyncIterator[broker_pb2.GenerateEvent]:
        for step in self.script.steps:
            if self.cancelled:
                return
            if isinstance(step, Wait):
                await step.event.wait()
            elif isinstance(step, Fail):
                raise _fail(step)
            elif isinstance(step, Text):
                yield broker_pb2.GenerateEvent(text_delta=broker_pb2.TextDelta(text=step.text))
            elif isinstance(step, Call):
                delta = broker_pb2.ToolCallDelta(
                    index=step.index, call_id=step.call_id, name=step.name, arguments=step.arguments
                )
                yield broker_pb2.GenerateEvent(tool_call_delta=delta)
            else:
                usage = common_pb2.Usage(
                    input_tokens=step.input_tokens,
                    output_tokens=step.output_tokens,
                    total_tokens=step.input_tokens + step.output_tokens,
                )
                reason = broker_pb2.FinishReason.Value("FINISH_REASON_" + step.reason.upper())
                yield broker_pb2.GenerateEvent(
                    finished=broker_pb2.Finished(reason=reason, usage=usage)
                )

    async def follow(self, handle: Callable[[broker_pb2.GenerateEvent], None]) -> None:
        async for event in self:
            handle(event)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class ScriptedModel:
    """The broker's side of the fake: scripted calls, and what was asked of it."""

    scripts: list[Script] = field(default_factory=list)
    requests: list[broker_pb2.GenerateRequest] = field(default_factory=list)
    # Response ids cancelled at the broker (`cancel_generate`), and attached to.
    cancelled: list[str] = field(default_factory=list)
    attached: list[tuple[str, str]] = field(default_factory=list)
    # Scripts of calls left running for an Attach (by response id).
    held: dict[str, Script] = field(default_factory=dict)

    def queue(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    def next_script(self) -> Script:
        return self.scripts.pop(0) if self.scripts else reply("ok")
