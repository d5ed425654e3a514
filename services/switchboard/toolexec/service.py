"""The `switchboard.v1.ToolExecService` servicer: every call becomes a typed answer.

`Execute` never aborts the RPC for a tool's failure: an unknown tool, a tool
the tenant may not use, bad arguments, a timeout, a crash or an oversized
result each come back as an `ExecuteResponse` with its `ToolOutcome`, an
`ErrorCode` from the one catalogue, and an `output` that is a JSON error object
fit to hand to the model as the function call's output (see `outcomes`).

Which tools a tenant may list and call comes from a `CatalogSource` (the
built-ins for everyone, or the tools file). A call is decided in this order:
the tool is looked up for the tenant and its arguments validated (refusals
here cost nothing and are never stored); then the call is claimed in the
`ResultStore`; then it runs.

Calls are idempotent by `(tenant_id, call_id)`. A retried call, or a duplicate
that arrives while the first is still running, gets the first call's result
with `replayed=True`; the tool runs once. In one process, duplicates attach to
the running call's task. Across replicas (`RedisResultStore`), the first
replica's claim makes the others poll for its result, for at most the tool's
timeout plus a margin. A call's run is a task of its own, so a caller that
gives up (its deadline passes) does not cancel the tool, and its retry
attaches to the same run. When the store cannot be reached the call is
refused (TOOL_EXECUTION_FAILED), not run: a tool with side effects must not
run twice because a duplicate went unseen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span

from switchboard.errors import code_name
from switchboard.telemetry import tracing
from switchboard.toolexec import outcomes
from switchboard.toolexec.catalog import CatalogSource, Refusal, Usable
from switchboard.toolexec.mcp_client import McpFailure
from switchboard.toolexec.mcp_tools import McpTools
from switchboard.toolexec.metrics import ToolExecMetrics
from switchboard.toolexec.outcomes import Attempt, fingerprint, ran, refused, short
from switchboard.toolexec.registry import CallInfo, ToolFailed
from switchboard.toolexec.results import (
    Claimed,
    MemoryResultStore,
    ResultStore,
    ResultStoreUnavailable,
    StoredResult,
)
from switchboard.toolexec.validation import InvalidArguments, parse_arguments
from switchboard.v1 import common_pb2, toolexec_pb2, toolexec_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
# A claim outlives the tool's timeout by this much, so it never ends while
# the call it guards can still be running (the timeout bounds the run).
LEASE_MARGIN_S = 5.0
DEFAULT_POLL_INTERVAL_S = 0.02
_MAX_POLL_INTERVAL_S = 0.25
# Claims retried after another replica's claim vanished without a result.
_MAX_CLAIMS = 3

_C = common_pb2
_T = toolexec_pb2
_INVALID = _C.ERROR_CODE_TOOL_INVALID_ARGUMENTS
_TIMEOUT = _C.ERROR_CODE_TOOL_TIMEOUT
_FAILED = _C.ERROR_CODE_TOOL_EXECUTION_FAILED
_ERROR = _T.TOOL_OUTCOME_EXECUTOR_ERROR


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A call that passed every check and may run."""

    usable: Usable
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Running:
    fingerprint: str
    task: asyncio.Task[Attempt]


class ToolExecServicer(toolexec_pb2_grpc.ToolExecServiceServicer):
    """Lists and runs the tools each tenant may use.

    Args:
        tools: the catalog in force, asked on every call (a `LiveCatalog`
            reloads its file behind it).
        mcp: lists and calls the tenants' MCP servers; without it, calls to an
            MCP server are `tool_not_found`.
        results: where calls are claimed and kept; a new `MemoryResultStore`
            by default, a `RedisResultStore` to share them across replicas.
        max_output_bytes: a larger result (UTF-8 JSON) is refused as
            EXECUTOR_ERROR, so one tool cannot flood the model's context.
        poll_interval_s: first wait between looks at a call running on another
            replica; it grows to a quarter second.
    """

    def __init__(
        self,
        tools: CatalogSource,
        *,
        results: ResultStore | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        metrics: ToolExecMetrics | None = None,
        mcp: McpTools | None = None,
    ) -> None:
        self._tools = tools
        self._mcp = mcp
        self.metrics = metrics or ToolExecMetrics()
        self._results: ResultStore = results if results is not None else MemoryResultStore()
        self._max_output_bytes = max_output_bytes
        self._poll_s = poll_interval_s
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
                    parameters_json=outcomes.compact_json(tool.parameters),
                    location=_C.TOOL_LOCATION_SERVER,
                )
                for tool in self._tools.current().tools_for(request.tenant_id)
            ]
        )

    async def ListMcpTools(
        self, request: toolexec_pb2.ListMcpToolsRequest, context: Any
    ) -> toolexec_pb2.ListMcpToolsResponse:
        """The usable tools of one of the tenant's MCP servers, sorted by name."""
        attributes = {
            "switchboard.mcp.server_label": short(request.server_label),
            **tracing.ids(request.tenant_id, request.session_id),
        }
        with tracing.span(
            tracing.tracer(__name__), "mcp_list_tools", attributes=attributes
        ) as span:
            server = self._tools.current().mcp_server(request.tenant_id, request.server_label)
            if server is None or self._mcp is None:
                tracing.record_error(span, "mcp_server_not_registered")
                return _T.ListMcpToolsResponse(
                    error_code=_C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED,
                    error_message=(
                        f"No MCP server labelled {short(request.server_label)!r} is registered "
                        "for this tenant."
                    ),
                )
            started = time.monotonic()
            try:
                listing = await self._mcp.listing(request.tenant_id, server)
            except McpFailure as exc:
                log.warning(
                    "mcp tools not listed",
                    extra={
                        "tenant_id": request.tenant_id,
                        "server_label": server.label,
                        "error": exc.message,
                    },
                )
                tracing.record_error(span, "mcp_list_tools_failed")
                self.metrics.observe_listing(server.label, "failed", started)
                return _T.ListMcpToolsResponse(
                    error_code=_C.ERROR_CODE_MCP_LIST_TOOLS_FAILED, error_message=exc.message
                )
            self.metrics.observe_listing(server.label, "ok", started)
            return _T.ListMcpToolsResponse(
                tools=[
                    _T.McpTool(
                        name=name,
                        description=listing.infos[name].description,
                        input_schema_json=outcomes.compact_json(listing.infos[name].input_schema),
                        annotations_json=(
                            outcomes.compact_json(listing.infos[name].annotations)
                            if listing.infos[name].annotations
                            else ""
                        ),
                        requires_approval=server.needs_approval(name),
                    )
                    for name in sorted(listing.tools)
                ]
            )

    async def Execute(
        self, request: toolexec_pb2.ExecuteRequest, context: Any
    ) -> toolexec_pb2.ExecuteResponse:
        """Run one call; see `execute`."""
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": short(request.name),
            **tracing.ids(request.tenant_id, request.session_id),
        }
        if request.call_id:
            attributes["gen_ai.tool.call.id"] = request.call_id
        label = request.mcp_server_label
        if label:
            attributes["switchboard.mcp.server_label"] = short(label)
        with tracing.span(tracing.tracer(__name__), "execute_tool", attributes=attributes) as span:
            response = await self.execute(request)
            _trace_outcome(span, request, response)
        # An MCP server's tools are named by its server, not by the tenant's file:
        # one label per server keeps the metric's labels bounded.
        self.metrics.observe(f"mcp:{short(label)}" if label else request.name, response)
        return response

    async def execute(self, request: toolexec_pb2.ExecuteRequest) -> toolexec_pb2.ExecuteResponse:
        """Run one call, or replay its stored result, and describe the outcome.

        Returns:
            An ExecuteResponse whose `outcome`, `error_code`, `output` and
            `duration_ms` are always set; `replayed` is True when another call
            with the same (tenant_id, call_id) ran the tool. A call without a
            call_id is never deduplicated.
        """
        started = time.monotonic()
        prepared = await self._prepare(request, started)
        if isinstance(prepared, Attempt):
            return prepared.response
        if not request.call_id:
            return (await self._run(prepared, request, started)).response
        key = (request.tenant_id, request.call_id)
        digest = fingerprint(request)
        running = self._running.get(key)
        if running is None:
            # Registered before any await: a duplicate arriving from here on
            # finds this run, and one arriving after it ends finds the store.
            task = asyncio.create_task(self._once(key, digest, prepared, request, started))
            self._running[key] = _Running(digest, task)
            # Shielded: a caller whose deadline passes must not cancel the tool.
            return (await asyncio.shield(task)).response
        if running.fingerprint != digest:
            return outcomes.reused_call_id(request, started).response
        attempt = await asyncio.shield(running.task)
        if attempt.keep:
            return outcomes.replay(attempt.response)
        return attempt.response

    async def _prepare(
        self, request: toolexec_pb2.ExecuteRequest, started: float
    ) -> _Prepared | Attempt:
        if request.mcp_server_label:
            found: Usable | Refusal | Attempt = await self._find_mcp(request, started)
        else:
            found = self._tools.current().find(request.tenant_id, request.name)
        if isinstance(found, Attempt):
            return found
        if found is Refusal.UNKNOWN_TOOL:
            message = f"No tool named {short(request.name)!r} is registered."
            outcome = _T.TOOL_OUTCOME_UNKNOWN_TOOL
            return refused(request, started, outcome, _C.ERROR_CODE_TOOL_NOT_FOUND, message)
        if found is Refusal.NOT_ALLOWED:
            message = f"The tool {short(request.name)!r} is not enabled for this tenant."
            outcome = _T.TOOL_OUTCOME_NOT_ALLOWED
            return refused(request, started, outcome, _C.ERROR_CODE_TOOL_NOT_ALLOWED, message)
        assert isinstance(found, Usable)
        try:
            arguments = parse_arguments(request.arguments)
            found.tool.schema.validate(arguments)
        except InvalidArguments as exc:
            outcome = _T.TOOL_OUTCOME_INVALID_ARGUMENTS
            return refused(request, started, outcome, _INVALID, exc.message)
        return _Prepared(found, arguments)

    async def _find_mcp(
        self, request: toolexec_pb2.ExecuteRequest, started: float
    ) -> Usable | Refusal | Attempt:
        """The tool `name` of the tenant's MCP server `mcp_server_label`."""
        label = request.mcp_server_label
        server = self._tools.current().mcp_server(request.tenant_id, label)
        if server is None or self._mcp is None:
            message = f"No MCP server labelled {short(label)!r} is registered for this tenant."
            outcome = _T.TOOL_OUTCOME_UNKNOWN_TOOL
            code = _C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED
            return refused(request, started, outcome, code, message)
        if not server.allows(request.name):
            return Refusal.NOT_ALLOWED
        try:
            listing = await self._mcp.listing(request.tenant_id, server)
        except McpFailure as exc:
            # Not run, not kept: a retry lists the tools again.
            return refused(request, started, _ERROR, _FAILED, exc.message)
        tool = listing.tools.get(request.name)
        if tool is None:
            return Refusal.UNKNOWN_TOOL
        return Usable(tool, self._mcp.semaphore(request.tenant_id, server))

    async def _once(
        self,
        key: tuple[str, str],
        digest: str,
        prepared: _Prepared,
        request: toolexec_pb2.ExecuteRequest,
        started: float,
    ) -> Attempt:
        try:
            lease_s = prepared.usable.tool.timeout_s + LEASE_MARGIN_S
            claim: Claimed | None = None
            for _ in range(_MAX_CLAIMS):
                try:
                    state = await self._results.claim(*key, digest, lease_s=lease_s)
                except ResultStoreUnavailable as exc:
                    return _store_unavailable(request, started, exc)
                if isinstance(state, Claimed):
                    claim = state
                    break
                if state.fingerprint != digest:
                    return outcomes.reused_call_id(request, started)
                if isinstance(state, StoredResult):
                    return _replayed(state)
                waited = await self._wait_elsewhere(key, digest, request, started, lease_s)
                if waited is not None:
                    return waited
            if claim is None:
                message = "The call is still being decided by another toolexec replica; retry it."
                return refused(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)
            attempt = await self._run(prepared, request, started)
            await self._settle(key, claim, digest, attempt, request)
            return attempt
        finally:
            self._running.pop(key, None)

    async def _wait_elsewhere(
        self,
        key: tuple[str, str],
        digest: str,
        request: toolexec_pb2.ExecuteRequest,
        started: float,
        bound_s: float,
    ) -> Attempt | None:
        """Wait for a call another replica runs: its answer, or None when its claim is gone."""
        deadline = time.monotonic() + bound_s
        delay = self._poll_s
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, _MAX_POLL_INTERVAL_S)
            try:
                state = await self._results.peek(*key)
            except ResultStoreUnavailable as exc:
                return _store_unavailable(request, started, exc)
            if state is None:
                # Released (the other replica refused the call) or its lease
                # ran out (that replica died): claim again.
                return None
            if state.fingerprint != digest:
                return outcomes.reused_call_id(request, started)
            if isinstance(state, StoredResult):
                return _replayed(state)
        message = "The call is still running on another toolexec replica; retry it later."
        return refused(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)

    async def _settle(
        self,
        key: tuple[str, str],
        claim: Claimed,
        digest: str,
        attempt: Attempt,
        request: toolexec_pb2.ExecuteRequest,
    ) -> None:
        """Keep the answer of a call that ran, or give back the claim of one that did not."""
        try:
            if attempt.keep:
                stored = StoredResult(digest, attempt.response.SerializeToString())
                await self._results.put(*key, stored)
            else:
                await self._results.release(*key, claim)
        except ResultStoreUnavailable as exc:
            # The caller still gets the answer; a retry after the lease ends
            # could run the tool again, which the log makes visible.
            fields = {**outcomes.ids(request), "error_type": type(exc.__cause__).__name__}
            log.error("tool call result not stored", extra=fields)

    async def _run(
        self, prepared: _Prepared, request: toolexec_pb2.ExecuteRequest, started: float
    ) -> Attempt:
        tool = prepared.usable.tool
        call = CallInfo(request.tenant_id, request.session_id, request.call_id, tool.name)
        deadline = asyncio.timeout(tool.timeout_s)
        entered = False
        try:
            async with deadline, prepared.usable.slots:
                entered = True
                result = await tool.executor(prepared.arguments, call)
        except TimeoutError as exc:
            if not deadline.expired():
                # The tool's own TimeoutError (say, of an HTTP client), not ours.
                return outcomes.crashed(tool, request, started, exc)
            if not entered:
                message = (
                    f"The tool {tool.name!r} is busy: no free slot within {tool.timeout_s:g} s "
                    f"({tool.max_concurrency} calls already running)."
                )
                return refused(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)
            outcomes.log_event(logging.WARNING, "tool timed out", tool, request, started)
            message = f"The tool {tool.name!r} did not finish within {tool.timeout_s:g} s."
            return ran(request, started, _T.TOOL_OUTCOME_TIMEOUT, _TIMEOUT, message)
        except InvalidArguments as exc:
            return ran(request, started, _T.TOOL_OUTCOME_INVALID_ARGUMENTS, _INVALID, exc.message)
        except ToolFailed as exc:
            outcomes.log_event(logging.WARNING, "tool failed", tool, request, started)
            return ran(request, started, _ERROR, _FAILED, exc.message)
        except Exception as exc:
            return outcomes.crashed(tool, request, started, exc)
        return self._finish(prepared, result, request, started)

    def _finish(
        self, prepared: _Prepared, result: Any, request: toolexec_pb2.ExecuteRequest, started: float
    ) -> Attempt:
        tool = prepared.usable.tool
        try:
            output = outcomes.compact_json(result)
            size = len(output.encode())
        except (TypeError, ValueError, RecursionError) as exc:
            # ValueError includes NaN, circular data and lone surrogates.
            outcomes.log_event(
                logging.ERROR, "tool result is not JSON", tool, request, started, exc
            )
            message = f"The tool {tool.name!r} returned a result that is not JSON."
            return ran(request, started, _ERROR, _FAILED, message)
        if size > self._max_output_bytes:
            outcomes.log_event(logging.WARNING, "tool result too large", tool, request, started)
            message = (
                f"The tool {tool.name!r} returned {size} bytes, more than the limit of "
                f"{self._max_output_bytes} bytes."
            )
            return ran(request, started, _ERROR, _FAILED, message)
        outcomes.log_event(logging.DEBUG, "tool ran", tool, request, started)
        return outcomes.ok(request, started, output)


def _trace_outcome(
    span: Span, request: toolexec_pb2.ExecuteRequest, response: toolexec_pb2.ExecuteResponse
) -> None:
    outcome = _T.ToolOutcome.Name(response.outcome).removeprefix("TOOL_OUTCOME_").lower()
    span.set_attributes(
        {"switchboard.tool.outcome": outcome, "switchboard.tool.replayed": response.replayed}
    )
    if response.outcome != _T.TOOL_OUTCOME_UNKNOWN_TOOL:
        # Only names that exist go into the span name: models invent names.
        span.update_name(f"execute_tool {short(request.name)}")
    if response.outcome != _T.TOOL_OUTCOME_OK:
        tracing.record_error(span, code_name(response.error_code or _FAILED))


def _replayed(stored: StoredResult) -> Attempt:
    response = _T.ExecuteResponse.FromString(stored.response)
    response.replayed = True
    return Attempt(response, keep=False)


def _store_unavailable(
    request: toolexec_pb2.ExecuteRequest, started: float, exc: ResultStoreUnavailable
) -> Attempt:
    log.error(
        "tool call store unavailable; call not run",
        extra={**outcomes.ids(request), "tool": short(request.name)},
    )
    return refused(request, started, _ERROR, _FAILED, exc.message)
