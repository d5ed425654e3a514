"""The asyncio pump around `RealtimeProtocol` for one WebSocket connection.

Reads frames, feeds them to the protocol, carries out the commands it returns
against the backends, and sends the events it queues through one writer task
and a bounded queue: a client that reads slowly makes the response stream wait
(and, through gRPC flow control, the broker and the upstream), instead of
growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from switchboard.errors import SwitchboardError, from_rpc_error
from switchboard.gateway.backends import Backends
from switchboard.gateway.protocol import (
    CancelResponse,
    Command,
    DeleteItem,
    RealtimeProtocol,
    RetrieveItem,
    StartResponse,
    StoreItem,
    UpdateSession,
    estimate_usage,
)
from switchboard.tenancy import Tenant
from switchboard.v1 import broker_pb2, common_pb2

log = logging.getLogger(__name__)

_FINISH = {
    broker_pb2.FINISH_REASON_LENGTH: ("incomplete", "max_output_tokens"),
    broker_pb2.FINISH_REASON_CONTENT_FILTER: ("incomplete", "content_filter"),
}


class RealtimeConnection:
    def __init__(
        self,
        websocket: WebSocket,
        protocol: RealtimeProtocol,
        backends: Backends,
        tenant: Tenant,
        *,
        send_queue_events: int,
    ) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.backends = backends
        self.tenant = tenant
        self.session_id = protocol.session_id
        self._outgoing: asyncio.Queue[str | None] = asyncio.Queue(maxsize=send_queue_events)
        self._flush_lock = asyncio.Lock()
        self._response_task: asyncio.Task[None] | None = None
        # The response whose stream may be cancelled now (None once it is finishing,
        # so a late cancel cannot interrupt storing its items).
        self._cancellable: str | None = None
        self._cancel_requested: str | None = None
        self._log = {"tenant_id": tenant.id, "session_id": self.session_id}

    async def run(self) -> None:
        """Serve the connection until the client leaves."""
        writer = asyncio.create_task(self._write_loop())
        try:
            self.protocol.open()
            await self._flush()
            while not writer.done():
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is not None:
                    commands = self.protocol.receive_text(text)
                else:
                    commands = self.protocol.receive_bytes(message.get("bytes") or b"")
                await self._flush()
                for command in commands:
                    await self._execute(command)
        finally:
            if self._response_task is not None:
                self._response_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._response_task
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    # --- sending ---------------------------------------------------------------------

    async def _flush(self) -> None:
        """Move the protocol's queued events to the writer, in order."""
        async with self._flush_lock:
            for event in self.protocol.take_events():
                await self._outgoing.put(orjson.dumps(event).decode())

    async def _write_loop(self) -> None:
        try:
            while True:
                text = await self._outgoing.get()
                if text is None:
                    return
                await self.websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):
            # The client is gone; the reader sees the disconnect and cleans up.
            return

    # --- commands --------------------------------------------------------------------

    async def _execute(self, command: Command) -> None:
        tenant, session = self.tenant.id, self.session_id
        try:
            match command:
                case StoreItem():
                    stored = await self.backends.append_item(
                        tenant, session, command.item, command.previous_item_id
                    )
                    self.protocol.item_added(stored.item, stored.previous_item_id)
                case UpdateSession():
                    await self.backends.update_session(tenant, session, command.config)
                    self.protocol.session_updated(command)
                case DeleteItem():
                    await self.backends.delete_item(tenant, session, command.item_id)
                    self.protocol.item_deleted(command.item_id)
                case RetrieveItem():
                    item = await self.backends.get_item(tenant, session, command.item_id)
                    self.protocol.item_retrieved(item)
                case StartResponse():
                    self._response_task = asyncio.create_task(self._run_response(command))
                case CancelResponse():
                    if self._response_task is not None and self._cancellable == command.response_id:
                        self._cancel_requested = command.response_id
                        self._response_task.cancel()
        except SwitchboardError as error:
            self.protocol.fail(error, command.client_event_id)
        await self._flush()

    async def _run_response(self, command: StartResponse) -> None:
        """Stream one response from the broker and finish it, whatever happens."""
        response_id = command.response_id
        status, reason = "completed", None
        error: SwitchboardError | None = None
        usage: common_pb2.Usage | None = None
        prompt_tokens = 0
        self._cancellable = response_id
        try:
            context = await self.backends.build_context(self.tenant.id, self.session_id)
            if command.instructions is not None:
                context.instructions = command.instructions
            prompt_tokens = context.estimated_tokens
            request = broker_pb2.GenerateRequest(
                tenant_id=self.tenant.id,
                session_id=self.session_id,
                response_id=response_id,
                model=command.model,
                context=context,
                tools=command.tools,
                tool_choice=command.tool_choice,
                max_output_tokens=command.max_output_tokens,
            )
            call = self.backends.generate(request)
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "text_delta":
                        self.protocol.text_delta(response_id, event.text_delta.text)
                        await self._flush()
                    elif kind == "finished":
                        usage = event.finished.usage
                        status, reason = _FINISH.get(event.finished.reason, ("completed", None))
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, service="broker") from None
            finally:
                call.cancel()
        except asyncio.CancelledError:
            if self._cancel_requested != response_id:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            status, reason = "cancelled", "client_cancelled"
        except SwitchboardError as exc:
            status, error = "failed", exc
            log.warning("response failed", extra={**self._log, "code": exc.name})
        finally:
            self._cancellable = None
        if usage is None:
            usage = estimate_usage(prompt_tokens, self.protocol.output_text(response_id))
        for item in self.protocol.complete_output(response_id, complete=status == "completed"):
            try:
                await self.backends.append_item(self.tenant.id, self.session_id, item)
            except SwitchboardError as exc:
                self.protocol.fail(exc)
        self.protocol.response_done(
            response_id, status=status, usage=usage, reason=reason, error=error
        )
        await self._flush()
