"""The `switchboard.v1.ToolExecService` servicer: every call becomes a typed answer.

`Execute` never aborts the RPC for a tool's failure: an unknown tool, a tool
the tenant may not use, bad arguments, a timeout, a crash or an oversized
result each come back as an `ExecuteResponse` with its `ToolOutcome`, an
`ErrorCode` from the one catalogue, and an `output` that is a JSON error object
fit to hand to the model as the function call's output:
`{"error": {"code": "tool_timeout", "message": "..."}}`.

Calls are idempotent by `(tenant_id, call_id)`. A retried call, or a duplicate
that arrives while the first is still running, gets the first call's result
with `replayed=True`; the tool runs once. A call's run is a task of its own,
so a caller that gives up (its deadline passes) does not cancel the tool, and
its retry attaches to the same run. Only results of calls that reached the
tool are kept: a refusal decided before running (unknown tool, bad arguments,
no free slot in time) is cheap to decide again. Results live in a bounded
in-memory LRU (`MemoryResultStore`) for now, per process; a later version
moves them to Redis behind the same `ResultStore` protocol, where the
in-flight check also needs a cross-process lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from switchboard import errors
from switchboard.toolexec.registry import Registry, Tool, ToolFailed
from switchboard.toolexec.validation import InvalidArguments, parse_arguments, validate
from switchboard.v1 import common_pb2, toolexec_pb2, toolexec_pb2_grpc

log = logging.getLogger(__name__)

_Outcome: TypeAlias = toolexec_pb2.ToolOutcome.ValueType
_Code: TypeAlias = common_pb2.ErrorCode.ValueType

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
DEFAULT_MAX_STORED_RESULTS = 10_000

_C = common_pb2
_T = toolexec_pb2
_NOT_FOUND = _C.ERROR_CODE_TOOL_NOT_FOUND
_INVALID = _C.ERROR_CODE_TOOL_INVALID_ARGUMENTS
_NOT_ALLOWED = _C.ERROR_CODE_TOOL_NOT_ALLOWED
_TIMEOUT = _C.ERROR_CODE_TOOL_TIMEOUT
_FAILED = _C.ERROR_CODE_TOOL_EXECUTION_FAILED
# Names from the model are echoed in messages; keep a long one from bloating them.
_MAX_NAME_CHARS = 64


class ToolPolicy(Protocol):
    """Decides which tools a tenant may list and call.

    A later version builds one from per-tenant configuration; until then every
    tenant may use every registered tool (`AllowAll`).
    """

    def allows(self, tenant_id: str, tool: Tool) -> bool: ...


class AllowAll:
    """The policy that lets every tenant use every tool."""

    def allows(self, tenant_id: str, tool: Tool) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A finished call kept for idempotency.

    Attributes:
        fingerprint: digest of the tool name and arguments text of the call,
            so a reused call_id with a different call is refused, not replayed.
        response: the serialised `ExecuteResponse` (bytes, ready for Redis).
    """

    fingerprint: str
    response: bytes


class ResultStore(Protocol):
    """Where finished calls are kept, by (tenant_id, call_id)."""

    async def get(self, tenant_id: str, call_id: str) -> StoredResult | None: ...

    async def put(self, tenant_id: str, call_id: str, result: StoredResult) -> None: ...


class MemoryResultStore:
    """A `ResultStore` in process memory, least recently used dropped first."""

    def __init__(self, max_entries: int = DEFAULT_MAX_STORED_RESULTS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], StoredResult] = OrderedDict()

    async def get(self, tenant_id: str, call_id: str) -> StoredResult | None:
        key = (tenant_id, call_id)
        result = self._entries.get(key)
        if result is not None:
            self._entries.move_to_end(key)
        return result

    async def put(self, tenant_id: str, call_id: str, result: StoredResult) -> None:
        self._entries[(tenant_id, call_id)] = result
        self._entries.move_to_end((tenant_id, call_id))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class _Attempt:
    response: toolexec_pb2.ExecuteResponse
    # True when the call reached the tool, so its result is kept for retries.
    keep: bool


@dataclass(frozen=True, slots=True)
class _Running:
    fingerprint: str
    task: asyncio.Task[_Attempt]


class ToolExecServicer(toolexec_pb2_grpc.ToolExecServiceServicer):
    """Lists and runs the tools of a `Registry`.

    Args:
        registry: the tools served; not changed while serving.
        policy: which tenant may use which tool; every tenant every tool by default.
        results: where finished calls are kept for idempotency; a new
            `MemoryResultStore` by default.
        max_output_bytes: a larger result (UTF-8 JSON) is refused as
            EXECUTOR_ERROR, so one tool cannot flood the model's context.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        policy: ToolPolicy | None = None,
        results: ResultStore | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self._registry = registry
        self._policy: ToolPolicy = policy or AllowAll()
        self._results: ResultStore = results if results is not None else MemoryResultStore()
        self._max_output_bytes = max_output_bytes
        self._running: dict[tuple[str, str], _Running] = {}

    async def ListTools(
        self, request: toolexec_pb2.ListToolsRequest, context: Any
    ) -> toolexec_pb2.ListToolsResponse:
        """The tools the tenant may call, sorted by name, located on the server."""
        return _T.ListToolsResponse(
            tools=[
                _C.ToolDefinition(
                    name=tool.name,
                    description=tool.description,
                    parameters_json=_compact_json(tool.parameters),
                    location=_C.TOOL_LOCATION_SERVER,
                )
                for tool in self._registry.list()
                if self._policy.allows(request.tenant_id, tool)
            ]
        )

    async def Execute(
        self, request: toolexec_pb2.ExecuteRequest, context: Any
    ) -> toolexec_pb2.ExecuteResponse:
        """Run one call; see `execute`."""
        return await self.execute(request)

    async def execute(self, request: toolexec_pb2.ExecuteRequest) -> toolexec_pb2.ExecuteResponse:
        """Run one call, or replay its stored result, and describe the outcome.

        Returns:
            An ExecuteResponse whose `outcome`, `error_code`, `output` and
            `duration_ms` are always set; `replayed` is True when another call
            with the same (tenant_id, call_id) ran the tool. A call without a
            call_id is never deduplicated.
        """
        if not request.call_id:
            return (await self._attempt(request)).response
        key = (request.tenant_id, request.call_id)
        fingerprint = _fingerprint(request)
        running = self._running.get(key)
        if running is None:
            # Registered before any await: a duplicate arriving from here on
            # finds this run, and one arriving after it ends finds the store.
            task = asyncio.create_task(self._once(key, fingerprint, request))
            self._running[key] = _Running(fingerprint, task)
            # Shielded: a caller whose deadline passes must not cancel the tool.
            return (await asyncio.shield(task)).response
        if running.fingerprint != fingerprint:
            return _reused_call_id(request, time.monotonic())
        attempt = await asyncio.shield(running.task)
        response = _T.ExecuteResponse()
        response.CopyFrom(attempt.response)
        response.replayed = attempt.keep or attempt.response.replayed
        return response

    async def _once(
        self, key: tuple[str, str], fingerprint: str, request: toolexec_pb2.ExecuteRequest
    ) -> _Attempt:
        started = time.monotonic()
        try:
            stored = await self._results.get(*key)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    return _Attempt(_reused_call_id(request, started), keep=False)
                response = _T.ExecuteResponse.FromString(stored.response)
                response.replayed = True
                return _Attempt(response, keep=False)
            attempt = await self._attempt(request)
            if attempt.keep:
                stored = StoredResult(fingerprint, attempt.response.SerializeToString())
                await self._results.put(*key, stored)
            return attempt
        finally:
            self._running.pop(key, None)

    async def _attempt(self, request: toolexec_pb2.ExecuteRequest) -> _Attempt:
        started = time.monotonic()
        tool = self._registry.get(request.name)
        if tool is None:
            message = f"No tool named {_short(request.name)!r} is registered."
            return _refused(request, started, _T.TOOL_OUTCOME_UNKNOWN_TOOL, _NOT_FOUND, message)
        if not self._policy.allows(request.tenant_id, tool):
            message = f"The tool {tool.name!r} is not enabled for this tenant."
            return _refused(request, started, _T.TOOL_OUTCOME_NOT_ALLOWED, _NOT_ALLOWED, message)
        try:
            arguments = parse_arguments(request.arguments)
            validate(arguments, tool.parameters)
        except InvalidArguments as exc:
            return _refused(
                request, started, _T.TOOL_OUTCOME_INVALID_ARGUMENTS, _INVALID, exc.message
            )
        return await self._run(tool, arguments, request, started)

    async def _run(
        self,
        tool: Tool,
        arguments: dict[str, Any],
        request: toolexec_pb2.ExecuteRequest,
        started: float,
    ) -> _Attempt:
        deadline = asyncio.timeout(tool.timeout_s)
        entered = False
        try:
            async with deadline, self._registry.semaphore(tool.name):
                entered = True
                result = await tool.executor(arguments)
        except TimeoutError as exc:
            if not deadline.expired():
                # The tool's own TimeoutError (say, of an HTTP client), not ours.
                return _crashed(tool, request, started, exc)
            if not entered:
                message = (
                    f"The tool {tool.name!r} is busy: no free slot within {tool.timeout_s:g} s "
                    f"({tool.max_concurrency} calls already running)."
                )
                return _refused(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)
            _log(logging.WARNING, "tool timed out", tool, request, started)
            message = f"The tool {tool.name!r} did not finish within {tool.timeout_s:g} s."
            return _ran(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)
        except InvalidArguments as exc:
            return _ran(request, started, _T.TOOL_OUTCOME_INVALID_ARGUMENTS, _INVALID, exc.message)
        except ToolFailed as exc:
            _log(logging.WARNING, "tool failed", tool, request, started)
            return _ran(request, started, _T.TOOL_OUTCOME_EXECUTOR_ERROR, _FAILED, exc.message)
        except Exception as exc:
            return _crashed(tool, request, started, exc)
        return self._finish(tool, result, request, started)

    def _finish(
        self, tool: Tool, result: Any, request: toolexec_pb2.ExecuteRequest, started: float
    ) -> _Attempt:
        try:
            output = _compact_json(result)
            size = len(output.encode())
        except (TypeError, ValueError, RecursionError) as exc:
            # ValueError includes NaN, circular data and lone surrogates.
            _log(logging.ERROR, "tool result is not JSON", tool, request, started, exc)
            message = f"The tool {tool.name!r} returned a result that is not JSON."
            return _ran(request, started, _T.TOOL_OUTCOME_EXECUTOR_ERROR, _FAILED, message)
        if size > self._max_output_bytes:
            _log(logging.WARNING, "tool result too large", tool, request, started)
            message = (
                f"The tool {tool.name!r} returned {size} bytes, more than the limit of "
                f"{self._max_output_bytes} bytes."
            )
            return _ran(request, started, _T.TOOL_OUTCOME_EXECUTOR_ERROR, _FAILED, message)
        _log(logging.DEBUG, "tool ran", tool, request, started)
        response = _T.ExecuteResponse(
            call_id=request.call_id,
            outcome=_T.TOOL_OUTCOME_OK,
            output=output,
            duration_ms=_elapsed_ms(started),
        )
        return _Attempt(response, keep=True)


def _refused(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: _Outcome,
    code: _Code,
    message: str,
) -> _Attempt:
    """A refusal decided before the tool ran: not kept, deciding again is cheap."""
    fields = {**_ids(request), "tool": _short(request.name), "error_code": errors.code_name(code)}
    log.info("tool call refused", extra=fields)
    return _Attempt(_error_response(request, started, outcome, code, message), keep=False)


def _ran(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: _Outcome,
    code: _Code,
    message: str,
) -> _Attempt:
    """A failure of a call that reached the tool: kept, so a retry does not run it again."""
    return _Attempt(_error_response(request, started, outcome, code, message), keep=True)


def _crashed(
    tool: Tool, request: toolexec_pb2.ExecuteRequest, started: float, exc: Exception
) -> _Attempt:
    """An unexpected exception: logged in full, the model is told only that it failed."""
    _log(logging.ERROR, "tool raised", tool, request, started, exc)
    message = f"The tool {tool.name!r} failed."
    return _ran(request, started, _T.TOOL_OUTCOME_EXECUTOR_ERROR, _FAILED, message)


def _reused_call_id(
    request: toolexec_pb2.ExecuteRequest, started: float
) -> toolexec_pb2.ExecuteResponse:
    message = f"The call_id {_short(request.call_id)!r} was already used for another call."
    outcome = _T.TOOL_OUTCOME_INVALID_ARGUMENTS
    return _refused(request, started, outcome, _INVALID, message).response


def _error_response(
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    outcome: _Outcome,
    code: _Code,
    message: str,
) -> toolexec_pb2.ExecuteResponse:
    output = _compact_json({"error": {"code": errors.code_name(code), "message": message}})
    return _T.ExecuteResponse(
        call_id=request.call_id,
        outcome=outcome,
        output=output,
        error_code=code,
        error_message=message,
        duration_ms=_elapsed_ms(started),
    )


def _log(
    level: int,
    event: str,
    tool: Tool,
    request: toolexec_pb2.ExecuteRequest,
    started: float,
    exc: BaseException | None = None,
) -> None:
    fields: dict[str, Any] = {
        **_ids(request),
        "tool": tool.name,
        "duration_ms": _elapsed_ms(started),
    }
    if exc is not None:
        # The type and the frames, not str(exc): exception messages often
        # quote the data they choked on, and arguments must stay out of logs.
        fields["error_type"] = type(exc).__name__
        fields["traceback"] = "".join(traceback.format_tb(exc.__traceback__))
    log.log(level, event, extra=fields)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _fingerprint(request: toolexec_pb2.ExecuteRequest) -> str:
    digest = hashlib.sha256(request.name.encode())
    digest.update(b"\0")
    digest.update(request.arguments.encode())
    return digest.hexdigest()


def _ids(request: toolexec_pb2.ExecuteRequest) -> dict[str, str]:
    return {
        "tenant_id": request.tenant_id,
        "session_id": request.session_id,
        "call_id": request.call_id,
    }


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_NAME_CHARS else text[:_MAX_NAME_CHARS] + "…"
