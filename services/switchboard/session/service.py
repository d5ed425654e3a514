"""The grpc.aio servicer of `switchboard.v1.SessionService`.

A thin layer over `SessionStore` and `build_context`: each RPC unpacks its
request, calls the store, and packs the reply. Every `SwitchboardError` becomes a
gRPC abort carrying its code in the trailing metadata (`abort_with`); anything
else is logged with the tenant and session ids (never item text) and becomes
`internal_error`, so a caller never sees a traceback. Every call is counted and
timed by method and outcome (`SessionMetrics`).
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

import grpc
import redis.exceptions

from switchboard.errors import InternalError, SwitchboardError, abort_with, missing_parameter
from switchboard.session.context import build_window
from switchboard.session.metrics import SessionMetrics
from switchboard.session.store import SessionStore
from switchboard.v1 import common_pb2, session_pb2, session_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.SessionService"


class _RpcErrors:
    """Async context manager that aborts the RPC with the error raised inside it,
    and counts and times the call by its outcome."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        request: Any,
        metrics: SessionMetrics,
    ) -> None:
        self._context = context
        self._method = method
        self._request = request
        self._metrics = metrics
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.monotonic()

    def _observe(self, outcome: str) -> None:
        self._metrics.observe(self._method, outcome, time.monotonic() - self._started)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Returning None lets every exception continue; abort_with raises the
        # gRPC abort in its place. Cancellation (a BaseException) passes untouched.
        if exc is None:
            self._observe("ok")
            return
        if not isinstance(exc, Exception):
            self._observe("cancelled")
            return
        # A store method turns a Redis outage into SessionStoreUnavailable
        # (the redis-py error is its cause); other Redis errors arrive as they are.
        cause = exc if isinstance(exc, redis.exceptions.RedisError) else exc.__cause__
        if isinstance(cause, redis.exceptions.RedisError):
            self._metrics.redis_errors.labels(type(cause).__name__).inc()
        ids = {
            "rpc": self._method,
            "tenant_id": getattr(self._request, "tenant_id", ""),
            "session_id": getattr(self._request, "session_id", ""),
        }
        if isinstance(exc, SwitchboardError):
            self._observe(exc.name)
            if exc.spec.grpc_status == grpc.StatusCode.UNAVAILABLE:
                log.warning("session store unavailable", extra={**ids, "code": exc.name})
            await abort_with(self._context, exc)
            return
        error = InternalError("The session service failed.")
        self._observe(error.name)
        log.error("session call failed", exc_info=exc, extra=ids)
        await abort_with(self._context, error)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Serves SessionService from a `SessionStore`."""

    def __init__(
        self,
        store: SessionStore,
        *,
        default_context_tokens: int,
        metrics: SessionMetrics | None = None,
    ) -> None:
        """Args:
        store: where sessions live; the caller owns its Redis client.
        default_context_tokens: the context budget when a request sets none.
        metrics: where calls are counted; a fresh registry of its own when None.
        """
        self._store = store
        self._default_context_tokens = default_context_tokens
        self.metrics = metrics or SessionMetrics()

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to a grpc.aio server (the `register` of `rpc.serve`)."""
        session_pb2_grpc.add_SessionServiceServicer_to_server(self, server)

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        async with _RpcErrors(context, "CreateSession", request, self.metrics):
            return await self._store.create_session(request.tenant_id, request.config)

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        async with _RpcErrors(context, "GetSession", request, self.metrics):
            return await self._store.get_session(request.tenant_id, request.session_id)

    async def UpdateSession(
        self, request: session_pb2.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        async with _RpcErrors(context, "UpdateSession", request, self.metrics):
            return await self._store.update_session(
                request.tenant_id, request.session_id, request.config
            )

    async def AppendItem(
        self, request: session_pb2.AppendItemRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendItemResponse:
        async with _RpcErrors(context, "AppendItem", request, self.metrics):
            item, previous_item_id = await self._store.append_item(
                request.tenant_id, request.session_id, request.item, request.previous_item_id
            )
            return session_pb2.AppendItemResponse(item=item, previous_item_id=previous_item_id)

    async def GetItem(
        self, request: session_pb2.GetItemRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Item:
        async with _RpcErrors(context, "GetItem", request, self.metrics):
            return await self._store.get_item(
                request.tenant_id, request.session_id, request.item_id
            )

    async def DeleteItem(
        self, request: session_pb2.DeleteItemRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteItemResponse:
        async with _RpcErrors(context, "DeleteItem", request, self.metrics):
            await self._store.delete_item(request.tenant_id, request.session_id, request.item_id)
            return session_pb2.DeleteItemResponse()

    async def BuildContext(
        self, request: session_pb2.BuildContextRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Context:
        async with _RpcErrors(context, "BuildContext", request, self.metrics):
            session, items = await self._store.load_conversation(
                request.tenant_id, request.session_id
            )
            requested = request.max_context_tokens
            budget = requested if requested > 0 else self._default_context_tokens
            instructions = session.config.instructions
            window, unsummarized = build_window(instructions, items, budget)
            return session_pb2.Context(
                instructions=instructions,
                items=window.items,
                estimated_tokens=window.estimated_tokens,
                dropped_items=window.dropped_items,
                unsummarized=unsummarized if request.include_unsummarized else (),
                unsummarized_count=len(unsummarized),
            )

    async def AppendEventsBatch(
        self, request: session_pb2.AppendEventsBatchRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendEventsBatchResponse:
        async with _RpcErrors(context, "AppendEventsBatch", request, self.metrics):
            outcomes = await self._store.events.append_batch(request.appends)
            return session_pb2.AppendEventsBatchResponse(results=map(_append_result, outcomes))

    async def ReadEvents(
        self, request: session_pb2.ReadEventsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ReadEventsResponse:
        async with _RpcErrors(context, "ReadEvents", request, self.metrics):
            events, last_seq, trimmed_seq = await self._store.events.read(
                request.tenant_id, request.session_id, request.after_seq, request.limit
            )
            return session_pb2.ReadEventsResponse(
                events=events, last_seq=last_seq, trimmed_seq=trimmed_seq
            )

    async def ClaimSession(
        self, request: session_pb2.ClaimSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ClaimSessionResponse:
        async with _RpcErrors(context, "ClaimSession", request, self.metrics):
            if not request.holder:
                raise missing_parameter("holder")
            return await self._store.events.claim(
                request.tenant_id, request.session_id, request.holder, request.lease_ms
            )
        raise AssertionError("unreachable")  # _RpcErrors aborts or re-raises

    async def ClaimSessionsBatch(
        self, request: session_pb2.ClaimSessionsBatchRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ClaimSessionsBatchResponse:
        async with _RpcErrors(context, "ClaimSessionsBatch", request, self.metrics):
            outcomes = await self._store.events.claim_batch(request.claims)
            return session_pb2.ClaimSessionsBatchResponse(results=map(_claim_result, outcomes))

    async def ReleaseSession(
        self, request: session_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ReleaseSessionResponse:
        async with _RpcErrors(context, "ReleaseSession", request, self.metrics):
            await self._store.events.release(request.tenant_id, request.session_id, request.holder)
        return session_pb2.ReleaseSessionResponse()


def _append_result(outcome: int | SwitchboardError) -> session_pb2.AppendEventsResult:
    """One append of a batch: its last seq, or its own error."""
    if isinstance(outcome, SwitchboardError):
        return session_pb2.AppendEventsResult(**_error_fields(outcome))
    return session_pb2.AppendEventsResult(last_seq=outcome)


def _claim_result(
    outcome: session_pb2.ClaimSessionResponse | SwitchboardError,
) -> session_pb2.ClaimSessionResult:
    """One claim of a batch: its answer, or its own error."""
    if isinstance(outcome, SwitchboardError):
        return session_pb2.ClaimSessionResult(**_error_fields(outcome))
    return session_pb2.ClaimSessionResult(claim=outcome)


def _error_fields(error: SwitchboardError) -> dict[str, Any]:
    """The error of one part of a batch, as the fields of its result."""
    return {
        "error_code": common_pb2.ErrorCode.ValueType(error.code),
        "error_message": error.message,
        "error_param": error.param or "",
    }
