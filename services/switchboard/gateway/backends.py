"""The gateway's clients of the session, broker and toolexec services.

`Backends` is what the gateway needs of them, as a protocol: `GrpcBackends`
implements it over gRPC, and `switchboard.gateway.testing.MemoryBackends` in
memory, for in-process tests. Each unary call has a deadline and turns any
failure into a `SwitchboardError` (a backend's own error code when it sent
one, else `service_unavailable`), and a model call (`ModelCall`) raises the
same way while it streams, so the turn and connection code never see a raw
`grpc.RpcError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
import orjson

from switchboard import rpc
from switchboard.config import GatewaySettings
from switchboard.errors import SwitchboardError, from_rpc_error
from switchboard.gateway.broker_stream import BrokerStream
from switchboard.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    common_pb2,
    moderation_pb2,
    moderation_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    toolexec_pb2,
    toolexec_pb2_grpc,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

# Channels kept to brokers by their own address (for Cancel and Attach); the
# oldest is closed past this many (broker pods come and go with deploys).
MAX_BROKER_CHANNELS = 32


class ModelCall(Protocol):
    """One streaming model call at a broker (a Generate, or an Attach to one);
    over gRPC, a `broker_stream.StreamedCall`."""

    async def broker(self) -> str:
        """The address the broker holding the call names itself by ("" if none),
        as soon as the call has started."""
        ...

    def __aiter__(self) -> AsyncIterator[broker_pb2.GenerateEvent]:
        """The call's events. Raises `SwitchboardError` when the call fails."""
        ...

    async def follow(self, handle: Callable[[broker_pb2.GenerateEvent], None]) -> None:
        """Hand each of the call's events to `handle`, in order, until the call
        ends; an alternative to iterating. `handle` must not block: it may run
        in whatever task receives the events (no wake-up of the caller's task
        per event).

        Raises:
            SwitchboardError: the call failed.
            Exception: what `handle` raised (no event is handed over after it).
        """
        ...

    def cancel(self) -> None:
        """Stop following the call (the broker keeps it for a re-attach unless it
        was cancelled there: `Backends.cancel_generate`)."""
        ...


class Backends(Protocol):
    """What the gateway asks of the session, broker and toolexec services."""

    # session
    async def create_session(
        self, tenant_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session: ...
    async def get_session(self, tenant_id: str, session_id: str) -> session_pb2.Session: ...
    async def update_session(
        self, tenant_id: str, session_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session: ...
    async def append_item(
        self,
        tenant_id: str,
        session_id: str,
        item: common_pb2.Item,
        previous_item_id: str = "",
        *,
        context_tokens: int | None = None,
    ) -> session_pb2.AppendItemResponse: ...
    async def get_item(self, tenant_id: str, session_id: str, item_id: str) -> common_pb2.Item: ...
    async def delete_item(self, tenant_id: str, session_id: str, item_id: str) -> None: ...
    async def build_context(
        self,
        tenant_id: str,
        session_id: str,
        *,
        max_context_tokens: int = 0,
        include_unsummarized: bool = False,
    ) -> session_pb2.Context: ...
    # the session's event log and writer lease
    async def append_events_batch(
        self, request: session_pb2.AppendEventsBatchRequest
    ) -> session_pb2.AppendEventsBatchResponse: ...
    async def read_events(
        self, tenant_id: str, session_id: str, after_seq: int, limit: int = 0
    ) -> session_pb2.ReadEventsResponse: ...
    async def claim_session(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse: ...
    async def claim_sessions_batch(
        self, claims: list[session_pb2.ClaimSessionRequest]
    ) -> session_pb2.ClaimSessionsBatchResponse: ...
    # broker
    def generate(self, request: broker_pb2.GenerateRequest) -> ModelCall: ...
    def attach(self, broker: str, tenant_id: str, response_id: str) -> ModelCall: ...
    def cancel_generate(self, broker: str, tenant_id: str, response_id: str) -> None: ...
    # toolexec
    async def list_tools(self, tenant_id: str) -> list[common_pb2.ToolDefinition]: ...
    async def execute_tool(
        self,
        tenant_id: str,
        session_id: str,
        call_id: str,
        name: str,
        arguments: str,
        *,
        mcp_server_label: str = "",
    ) -> toolexec_pb2.ExecuteResponse: ...
    async def list_mcp_tools(
        self, tenant_id: str, session_id: str, server_label: str
    ) -> toolexec_pb2.ListMcpToolsResponse: ...
    # moderation (served by the broker)
    async def moderate(
        self, tenant_id: str, session_id: str, texts: list[str], timeout_s: float
    ) -> moderation_pb2.ModerateResponse: ...
    # the process
    async def readiness(self) -> dict[str, bool]: ...
    def spawn(self, work: Coroutine[Any, Any, None]) -> None: ...
    async def close(self) -> None: ...


class GrpcBackends:
    """Channels and stubs to the three backends, opened in the app's lifespan."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.timeout_s = settings.rpc_timeout_s
        self.tool_timeout_s = settings.tool_timeout_s
        self.channels = {
            "session": rpc.channel(settings.session_target),
            "broker": rpc.channel(settings.broker_target),
            "toolexec": rpc.channel(settings.toolexec_target),
        }
        self.session = session_pb2_grpc.SessionServiceStub(self.channels["session"])
        self.broker = broker_pb2_grpc.BrokerServiceStub(self.channels["broker"])
        self.toolexec = toolexec_pb2_grpc.ToolExecServiceStub(self.channels["toolexec"])
        self.moderation = moderation_pb2_grpc.ModerationServiceStub(self.channels["broker"])
        self.broker_target = settings.broker_target
        self._brokers: dict[str, tuple[grpc.aio.Channel, broker_pb2_grpc.BrokerServiceStub]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Model calls go over one stream per broker (broker_stream.py).
        self._default_stream = BrokerStream(self.broker, settings.broker_target)
        self._streams: dict[str, BrokerStream] = {}

    async def close(self) -> None:
        streams = [self._default_stream, *self._streams.values()]
        await asyncio.gather(*(stream.close() for stream in streams))
        channels = [*self.channels.values(), *(channel for channel, _ in self._brokers.values())]
        await asyncio.gather(*(channel.close() for channel in channels))

    async def readiness(self) -> dict[str, bool]:
        """Whether each backend answers its gRPC health check with SERVING."""
        names = list(self.channels)
        results = await asyncio.gather(
            *(rpc.check_health(self.channels[name], timeout_s=1.0) for name in names)
        )
        return dict(zip(names, results, strict=True))

    async def _call(self, service: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service=service) from None

    # --- session ---------------------------------------------------------------------

    async def create_session(
        self, tenant_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        request = session_pb2.CreateSessionRequest(tenant_id=tenant_id, config=config)
        return await self._call(
            "session", self.session.CreateSession(request, timeout=self.timeout_s)
        )

    async def update_session(
        self, tenant_id: str, session_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        request = session_pb2.UpdateSessionRequest(
            tenant_id=tenant_id, session_id=session_id, config=config
        )
        return await self._call(
            "session", self.session.UpdateSession(request, timeout=self.timeout_s)
        )

    async def append_item(
        self,
        tenant_id: str,
        session_id: str,
        item: common_pb2.Item,
        previous_item_id: str = "",
        *,
        context_tokens: int | None = None,
    ) -> session_pb2.AppendItemResponse:
        """Store `item`; with `context_tokens` (a budget, 0: the service's default),
        the reply's `context` is the session's context right after it, read with it."""
        request = session_pb2.AppendItemRequest(
            tenant_id=tenant_id,
            session_id=session_id,
            item=item,
            previous_item_id=previous_item_id,
            with_context=context_tokens is not None,
            max_context_tokens=context_tokens or 0,
        )
        return await self._call("session", self.session.AppendItem(request, timeout=self.timeout_s))

    async def get_item(self, tenant_id: str, session_id: str, item_id: str) -> common_pb2.Item:
        request = session_pb2.GetItemRequest(
            tenant_id=tenant_id, session_id=session_id, item_id=item_id
        )
        return await self._call("session", self.session.GetItem(request, timeout=self.timeout_s))

    async def delete_item(self, tenant_id: str, session_id: str, item_id: str) -> None:
        request = session_pb2.DeleteItemRequest(
            tenant_id=tenant_id, session_id=session_id, item_id=item_id
        )
        await self._call("session", self.session.DeleteItem(request, timeout=self.timeout_s))

    async def build_context(
        self,
        tenant_id: str,
        session_id: str,
        *,
        max_context_tokens: int = 0,
        include_unsummarized: bool = False,
    ) -> session_pb2.Context:
        request = session_pb2.BuildContextRequest(
            tenant_id=tenant_id,
            session_id=session_id,
            max_context_tokens=max_context_tokens,
            include_unsummarized=include_unsummarized,
        )
        return await self._call(
            "session", self.session.BuildContext(request, timeout=self.timeout_s)
        )

    # --- broker ----------------------------------------------------------------------

    def generate(self, request: broker_pb2.GenerateRequest) -> ModelCall:
        """Start a streaming model call. No deadline: a response may stream for minutes.
        To stop it, `cancel_generate` it at its broker, then cancel the call: a
        call cancelled alone is kept running by its broker for a re-attach."""
        return self._stream_at("").generate(request)

    def attach(self, broker: str, tenant_id: str, response_id: str) -> ModelCall:
        """Follow a model call another gateway started (and died running), at the
        broker that holds it ("": the configured broker target)."""
        request = broker_pb2.AttachRequest(tenant_id=tenant_id, response_id=response_id)
        return self._stream_at(broker).attach(request)

    def cancel_generate(self, broker: str, tenant_id: str, response_id: str) -> None:
        """Stop a model call at the broker that holds it, in the background: the
        call's own cancellation follows at once, and a broker that does not answer
        drops an abandoned call after its orphan grace anyway."""
        request = broker_pb2.CancelRequest(tenant_id=tenant_id, response_id=response_id)
        self.spawn(self._cancel(broker, request))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, referenced until it is done."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, broker: str, request: broker_pb2.CancelRequest) -> None:
        try:
            await self._broker_at(broker).Cancel(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, service="broker")
            log.warning(
                "model call not cancelled",
                extra={"response_id": request.response_id, "code": error.name},
            )

    def _stream_at(self, address: str) -> BrokerStream:
        """The stream of model calls to the broker at `address` ("": the configured target)."""
        if not address or address == self.broker_target:
            return self._default_stream
        stream = self._streams.get(address)
        if stream is None:
            stream = self._streams[address] = BrokerStream(self._broker_at(address), address)
        return stream

    def _broker_at(self, address: str) -> broker_pb2_grpc.BrokerServiceStub:
        """The stub of the broker at `address` (HOST:PORT a broker named itself by)."""
        if not address or address == self.broker_target:
            return self.broker
        known = self._brokers.pop(address, None)
        if known is None:
            if len(self._brokers) >= MAX_BROKER_CHANNELS:
                oldest = next(iter(self._brokers))
                channel, _ = self._brokers.pop(oldest)
                stream = self._streams.pop(oldest, None)
                if stream is not None:
                    self.spawn(stream.close())
                self.spawn(channel.close(grace=self.timeout_s))
            channel = rpc.channel(address)
            known = (channel, broker_pb2_grpc.BrokerServiceStub(channel))
        self._brokers[address] = known  # the newest last
        return known[1]

    # --- toolexec --------------------------------------------------------------------

    async def list_tools(self, tenant_id: str) -> list[common_pb2.ToolDefinition]:
        request = toolexec_pb2.ListToolsRequest(tenant_id=tenant_id)
        reply = await self._call(
            "toolexec", self.toolexec.ListTools(request, timeout=self.timeout_s)
        )
        return list(reply.tools)

    async def execute_tool(
        self,
        tenant_id: str,
        session_id: str,
        call_id: str,
        name: str,
        arguments: str,
        *,
        mcp_server_label: str = "",
    ) -> toolexec_pb2.ExecuteResponse:
        """Run a server-side tool (of the MCP server `mcp_server_label`, when given).
        Never raises: an unreachable toolexec is an outcome too."""
        request = toolexec_pb2.ExecuteRequest(
            tenant_id=tenant_id,
            session_id=session_id,
            call_id=call_id,
            name=name,
            arguments=arguments,
            mcp_server_label=mcp_server_label,
        )
        try:
            return await self._call(
                "toolexec", self.toolexec.Execute(request, timeout=self.tool_timeout_s)
            )
        except SwitchboardError as error:
            return toolexec_pb2.ExecuteResponse(
                call_id=call_id,
                outcome=toolexec_pb2.TOOL_OUTCOME_EXECUTOR_ERROR,
                output=orjson.dumps(
                    {"error": {"code": error.name, "message": error.message}}
                ).decode(),
                error_code=common_pb2.ErrorCode.ValueType(error.code),
                error_message=error.message,
            )

    async def list_mcp_tools(
        self, tenant_id: str, session_id: str, server_label: str
    ) -> toolexec_pb2.ListMcpToolsResponse:
        """The tools of one of the tenant's MCP servers; a failed listing is an answer.

        Raises:
            SwitchboardError: toolexec cannot be reached.
        """
        request = toolexec_pb2.ListMcpToolsRequest(
            tenant_id=tenant_id, session_id=session_id, server_label=server_label
        )
        # The listing may wait for the server (its list_timeout_s, at most a minute).
        reply: toolexec_pb2.ListMcpToolsResponse = await self._call(
            "toolexec", self.toolexec.ListMcpTools(request, timeout=self.tool_timeout_s)
        )
        return reply

    async def moderate(
        self, tenant_id: str, session_id: str, texts: list[str], timeout_s: float
    ) -> moderation_pb2.ModerateResponse:
        """The tenant's moderation verdicts of `texts`.

        Raises:
            SwitchboardError: the check could not be made (the broker's upstream error).
        """
        request = moderation_pb2.ModerateRequest(
            tenant_id=tenant_id, session_id=session_id, input=texts
        )
        reply: moderation_pb2.ModerateResponse = await self._call(
            "broker", self.moderation.Moderate(request, timeout=timeout_s + 1.0)
        )
        return reply

    # --- session event log (resume) ------------------------------------------------------

    async def get_session(self, tenant_id: str, session_id: str) -> session_pb2.Session:
        request = session_pb2.GetSessionRequest(tenant_id=tenant_id, session_id=session_id)
        return await self._call("session", self.session.GetSession(request, timeout=self.timeout_s))

    async def append_events_batch(
        self, request: session_pb2.AppendEventsBatchRequest
    ) -> session_pb2.AppendEventsBatchResponse:
        return await self._call(
            "session", self.session.AppendEventsBatch(request, timeout=self.timeout_s)
        )

    async def read_events(
        self, tenant_id: str, session_id: str, after_seq: int, limit: int = 0
    ) -> session_pb2.ReadEventsResponse:
        request = session_pb2.ReadEventsRequest(
            tenant_id=tenant_id, session_id=session_id, after_seq=after_seq, limit=limit
        )
        return await self._call("session", self.session.ReadEvents(request, timeout=self.timeout_s))

    async def claim_session(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse:
        request = session_pb2.ClaimSessionRequest(
            tenant_id=tenant_id, session_id=session_id, holder=holder, lease_ms=lease_ms
        )
        return await self._call(
            "session", self.session.ClaimSession(request, timeout=self.timeout_s)
        )

    async def claim_sessions_batch(
        self, claims: list[session_pb2.ClaimSessionRequest]
    ) -> session_pb2.ClaimSessionsBatchResponse:
        request = session_pb2.ClaimSessionsBatchRequest(claims=claims)
        return await self._call(
            "session", self.session.ClaimSessionsBatch(request, timeout=self.timeout_s)
        )
