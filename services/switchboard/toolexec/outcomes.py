"""How a call's outcome becomes an `ExecuteResponse`, and how it is logged.

Every failure answer has `outcome`, `error_code`, `error_message` and an
`output` that is a JSON error object fit to give to the model as the function
call's output: `{"error": {"code": "tool_timeout", "message": "..."}}`.
An `Attempt` also says whether the answer is kept for retries: answers of
calls that reached the tool are (a retry must not run it again), refusals
decided before running are not (deciding again is cheap and may change).

Log lines carry the tenant, session and call ids and the tool, never argument
values or exception messages (which often quote the data they choked on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, TypeAlias

from switchboard import errors
from switchboard.toolexec.registry import Tool
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

Outcome: TypeAlias = toolexec_pb2.ToolOutcome.ValueType
Code: TypeAlias = common_pb2.ErrorCode.ValueType

# Names from the model are echoed in messages; keep a long one from bloating them.
MAX_NAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class Attempt:
    """The answer to a call, and whether it is kept for retries of the same call_id."""

    response: toolexec_pb2.ExecuteResponse
    keep: bool


def refused(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: Outcome,
    code: Code,
    message: str,
) -> Attempt:
    """A refusal decided before the tool ran: not kept."""
    fields = {**ids(request), "tool": short(request.name), "error_code": errors.code_name(code)}
    log.info("tool call refused", extra=fields)
    return Attempt(error_response(request, started, outcome, code, message), keep=False)


def ran(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: Outcome,
    code: Code,
    message: str,
) -> Attempt:
    """A failure of a call that reached the tool: kept, so a retry does not run it again."""
    return Attempt(error_response(request, started, outcome, code, message), keep=True)


def crashed(
    tool: Tool, request: toolexec_pb2.ExecuteRequest, started: float, exc: Exception
) -> Attempt:
    """An unexpected exception: logged in full, the model is told only that it failed."""
    log_event(logging.ERROR, "tool raised", tool, request, started, exc)
    message = f"The tool {tool.name!r} failed."
    outcome = toolexec_pb2.TOOL_OUTCOME_EXECUTOR_ERROR
    return ran(request, started, outcome, common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED, message)


def reused_call_id(request: toolexec_pb2.ExecuteRequest, started: float) -> Attempt:
    """A call_id already used for a different tool or arguments: refused, not replayed."""
    message = f"The call_id {short(request.call_id)!r} was already used for another call."
    outcome = toolexec_pb2.TOOL_OUTCOME_INVALID_ARGUMENTS
    return refused(request, started, outcome, common_pb2.ERROR_CODE_TOOL_INVALID_ARGUMENTS, message)


def ok(request: toolexec_pb2.ExecuteRequest, started: float, output: str) -> Attempt:
    response = toolexec_pb2.ExecuteResponse(
        call_id=request.call_id,
        outcome=toolexec_pb2.TOOL_OUTCOME_OK,
        output=output,
        duration_ms=elapsed_ms(started),
    )
    return Attempt(response, keep=True)


def replay(response: toolexec_pb2.ExecuteResponse) -> toolexec_pb2.ExecuteResponse:
    """A copy of a kept answer, marked as replayed."""
    copy = toolexec_pb2.ExecuteResponse()
    copy.CopyFrom(response)
    copy.replayed = True
    return copy


def error_response(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: Outcome,
    code: Code,
    message: str,
) -> toolexec_pb2.ExecuteResponse:
    output = compact_json({"error": {"code": errors.code_name(code), "message": message}})
    return toolexec_pb2.ExecuteResponse(
        call_id=request.call_id,
        outcome=outcome,
        output=output,
        error_code=code,
        error_message=message,
        duration_ms=elapsed_ms(started),
    )


def log_event(
    level: int,
    event: str,
    tool: Tool,
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    exc: BaseException | None = None,
) -> None:
    fields: dict[str, Any] = {
        **ids(request),
        "tool": tool.name,
        "duration_ms": elapsed_ms(started),
    }
    if exc is not None:
        # The type and the frames, not str(exc): exception messages often
        # quote the data they choked on, and arguments must stay out of logs.
        fields["error_type"] = type(exc).__name__
        fields["traceback"] = "".join(traceback.format_tb(exc.__traceback__))
    log.log(level, event, extra=fields)


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(request: toolexec_pb2.ExecuteRequest) -> str:
    """Digest of the tool name and arguments text: what makes two calls "the same"."""
    digest = hashlib.sha256(request.name.encode())
    if request.mcp_server_label:
        digest.update(b"\0mcp\0" + request.mcp_server_label.encode())
    digest.update(b"\0")
    digest.update(request.arguments.encode())
    return digest.hexdigest()


def ids(request: toolexec_pb2.ExecuteRequest) -> dict[str, str]:
    return {
        "tenant_id": request.tenant_id,
        "session_id": request.session_id,
        "call_id": request.call_id,
    }


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def short(text: str) -> str:
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS] + "…"
