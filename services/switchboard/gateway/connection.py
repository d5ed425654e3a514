"""The asyncio pump around `RealtimeProtocol` for one WebSocket connection.

Reads frames, feeds them to the protocol, carries out the commands it returns
against the backends, and sends the events it queues through one writer task
and a bounded `Outbox`: a client that reads slowly gets merged deltas, and one
that falls too far behind is closed with 4008 `slow_consumer` instead of growing
the gateway's memory (see outbox.py).

The writer records each batch of events in the session's event log before it
sends it (eventlog.py), so a client that loses the connection can resume. A
client that leaves (or is cut as a slow consumer) while a response runs does
not lose it: the connection goes on "detached", recording without sending,
for up to `disconnect_grace_s`, and hands the session to a resuming connection
when the response ends. The same end-of-turn hook closes a draining gateway's
connections (1012), connections past their session length (4011) and idle ones
(4010).

A model call outlives a gateway that dies: the broker keeps a call whose
caller vanished without cancelling it. So the connection notes, for each
response, the broker that names itself on the call; stops a call on purpose
only with an explicit cancel at that broker; and a connection that resumes a
session whose gateway died mid-response re-attaches to the call there and
finishes the response (`Reattach`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from starlette.websockets import WebSocket, WebSocketDisconnect

from switchboard import errors
from switchboard.errors import SessionTakenOver, SwitchboardError, from_rpc_error
from switchboard.gateway import spans
from switchboard.gateway.admission import CONNECTION_LEASE_S, Admission, Admitted
from switchboard.gateway.backends import Backends
from switchboard.gateway.eventlog import EventRecorder, SessionWriter
from switchboard.gateway.metrics import GatewayMetrics, refusal_reason
from switchboard.gateway.outbox import Close, Outbox, SlowConsumer
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
from switchboard.rpc import BROKER_METADATA_KEY
from switchboard.tenancy import Tenant
from switchboard.v1 import broker_pb2, common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

_DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})

# The close code of a client that fell too far behind (docs/errors.md: slow_consumer).
SLOW_CONSUMER_CLOSE = errors.spec(common_pb2.ERROR_CODE_SLOW_CONSUMER).close_code or 4008
# A gateway that drains closes its connections with 1012 "service restart".
DRAIN_CLOSE = 1012

_FINISH = {
    broker_pb2.FINISH_REASON_LENGTH: ("incomplete", "max_output_tokens"),
    broker_pb2.FINISH_REASON_CONTENT_FILTER: ("incomplete", "content_filter"),
}

_TAKEN_OVER = SessionTakenOver("Another connection resumed this session.")
_NOT_RECOVERED = SwitchboardError(
    "The gateway running this response stopped, and its model call could not be taken "
    "up again; the text sent so far is kept as an incomplete item. Ask again with "
    "response.create.",
    code=common_pb2.ERROR_CODE_RESPONSE_INTERRUPTED,
)

# What a broker answers an Attach with when the call is gone (or the broker is):
# the response cannot be finished.
_NOT_REATTACHED = frozenset(
    {common_pb2.ERROR_CODE_RESPONSE_INTERRUPTED, common_pb2.ERROR_CODE_SERVICE_UNAVAILABLE}
)

# How long a cut slow consumer has to read its backlog and get its close frame.
_CLOSE_FRAME_WAIT_S = 10.0

# What a detached connection may hold while it records: far above what Redis
# needs to keep up, but a bound all the same.
_DETACHED_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reattach:
    """A response another gateway left streaming when it died, to finish here: the
    rest of its turn, and the broker that holds its model call ("": unknown)."""

    command: StartResponse
    broker: str


class RealtimeConnection:
    def __init__(
        self,
        websocket: WebSocket,
        protocol: RealtimeProtocol,
        backends: Backends,
        tenant: Tenant,
        admission: Admission,
        metrics: GatewayMetrics,
        recorder: EventRecorder,
        *,
        max_buffered_bytes: int,
        max_tool_rounds: int,
        holder: str,
        disconnect_grace_s: float = 30.0,
        idle_timeout_s: float = 0.0,
        session_lease_s: float = 10.0,
    ) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.backends = backends
        self.tenant = tenant
        self.admission = admission
        self.metrics = metrics
        # Why the connection ended, for the disconnects metric.
        self.end_reason = "client_closed"
        # The response being timed: when it was asked for, when its last delta went out.
        self._asked_at = 0.0
        self._last_delta_at: float | None = None
        self.session_id = protocol.session_id
        self.outbox = Outbox(max_bytes=max_buffered_bytes)
        self._response_task: asyncio.Task[None] | None = None
        # The response whose stream may be cancelled now (None once it is finishing,
        # so a late cancel cannot interrupt storing its items).
        self._cancellable: str | None = None
        self._cancel_requested: str | None = None
        self._cancel_reason = "client_cancelled"
        self.max_tool_rounds = max_tool_rounds
        self._server_tool_cache: tuple[float, dict[str, common_pb2.ToolDefinition]] | None = None
        self._log = {"tenant_id": tenant.id, "session_id": self.session_id}
        # Who holds this connection's slot in the limits store (and the session's lease).
        self.holder = holder
        self.writer = SessionWriter(
            backends, recorder, tenant.id, self.session_id, holder, session_lease_s
        )
        # False once the client is gone (or cut): events are recorded, not sent.
        self.attached = True
        self.disconnect_grace_s = disconnect_grace_s
        self.idle_timeout_s = idle_timeout_s
        self.session_lease_s = session_lease_s
        self.opened_at = time.monotonic()
        self._last_client_event = self.opened_at
        # Set when the connection must end after the running turn: (code, reason).
        self._ending: tuple[int, str] | None = None
        self._unrecorded_warned = False
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        # True while the writer waits on the client's socket (it may be cut then).
        self._sending = False
        # Set when the gateway cuts the client (slow consumer): stop reading it.
        self._cut = asyncio.Event()
        # The running response's admission (its slot is renewed while it runs).
        self._admitted: Admitted | None = None

    async def run(self, *, resumed: bool = False, reattach: Reattach | None = None) -> None:
        """Serve the connection until the client leaves (or it must end), then let
        a running response finish detached, within the disconnect grace.

        Args:
            resumed: the client resumed the session (no `session.created`).
            reattach: a response to finish first, left by a gateway that died.
        """
        self._writer = asyncio.create_task(self._write_loop())
        cut = asyncio.create_task(self._cut.wait())
        helpers = [
            cut,
            asyncio.create_task(self._keep_connection_slot()),
            asyncio.create_task(self._keep_session_lease()),
            asyncio.create_task(self._watch_time_limits()),
        ]
        try:
            if not resumed:
                self.protocol.open()
            await self._flush()
            if reattach is not None:
                self._start_turn(reattach.command, reattach)
            while not self._writer.done():
                receive = asyncio.ensure_future(self.websocket.receive())
                await asyncio.wait(
                    (receive, self._writer, cut), return_when=asyncio.FIRST_COMPLETED
                )
                if not receive.done():
                    receive.cancel()
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    break
                self._last_client_event = time.monotonic()
                text = message.get("text")
                if text is not None:
                    commands = self.protocol.receive_text(text)
                else:
                    commands = self.protocol.receive_bytes(message.get("bytes") or b"")
                await self._flush()
                for command in commands:
                    await self._execute(command)
        finally:
            self.attached = False
            if self._writer.done() and not self.outbox.ended:
                # The writer was stopped mid-send to a cut client: record the rest.
                self._writer = asyncio.create_task(self._write_loop())
            await self._finish_detached()
            # Ends the (detached) writer once it has recorded what waits; the
            # code is never sent. Waiting longer than a lease would be pointless:
            # by then a resume elsewhere owns the session.
            self.outbox.close(DRAIN_CLOSE, "closed")
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._writer, timeout=self.session_lease_s)
            for task in (self._writer, *helpers):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                await self.writer.release()
            except SwitchboardError as exc:
                log.warning("session lease not released", extra={**self._log, "code": exc.name})
            if self._closer is not None:
                # A cut client gets its close frame (4008) once it reads its
                # backlog: give it that long before the socket goes.
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._closer, timeout=_CLOSE_FRAME_WAIT_S)

    async def _finish_detached(self) -> None:
        """Let the running turn end within the disconnect grace; then cancel it (its
        response ends `cancelled` with reason `client_disconnected`)."""
        task = self._response_task
        if task is None or task.done():
            return
        if self.end_reason == "client_closed" and self._ending is None:
            log.info("client left during a response", extra=self._log)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.disconnect_grace_s)
            return
        except TimeoutError:
            pass
        except (asyncio.CancelledError, Exception):
            # The turn failed or was cancelled on its own; nothing more to wait for.
            if task.done():
                return
        if self._cancellable is not None:
            self._cancel_requested = self._cancellable
            self._cancel_reason = "client_disconnected"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await self._flush()

    def drain(self) -> None:
        """The gateway is draining: close with 1012 once the running turn ends."""
        self._end_after_turn(DRAIN_CLOSE, "draining", "drain")

    def stop_now(self) -> None:
        """The drain deadline passed: end the running response (`cancelled`, reason
        `drain`) and close with 1012; the client resumes elsewhere."""
        self.disconnect_grace_s = 0.0
        self._ending = (DRAIN_CLOSE, "draining")
        self.end_reason = "drain"
        task = self._response_task
        if task is not None and not task.done():
            if self._cancellable is not None:
                self._cancel_requested = self._cancellable
                self._cancel_reason = "drain"
            task.cancel()
        else:
            self.outbox.close(DRAIN_CLOSE, "draining")

    def _end_after_turn(self, code: int, reason: str, end_reason: str) -> None:
        if self._ending is not None:
            return
        self._ending = (code, reason)
        self.end_reason = end_reason
        if self._response_task is None or self._response_task.done():
            self.outbox.close(code, reason)

    def _end_with_error(self, error: SwitchboardError, end_reason: str) -> None:
        """Tell the client why, then close with the error's code after the turn."""
        if self._ending is not None:
            return
        self.protocol.fail(error)
        self._queue_events()
        self._end_after_turn(error.spec.close_code or 1011, error.name, end_reason)

    def _turn_ended(self, task: asyncio.Task[None]) -> None:
        if self._ending is not None and task is self._response_task:
            self.outbox.close(*self._ending)

    @property
    def _model_label(self) -> str:
        """The session's model as a metric label: only models a tenants file lists
        (development tenants may send any name, which would be an unbounded label)."""
        model = self.protocol.config.model
        return model if model in self.tenant.models else "other"

    def _timed_delta(self) -> None:
        """Time to first token for the first delta of a response, gaps after it."""
        now = time.monotonic()
        model = self._model_label
        if self._last_delta_at is None:
            self.metrics.time_to_first_token.labels(model).observe(now - self._asked_at)
        else:
            self.metrics.inter_token.labels(model).observe(now - self._last_delta_at)
        self._last_delta_at = now

    async def _keep_connection_slot(self) -> None:
        """Renew the connection's slot lease while the connection lives, and the
        running response's."""
        while True:
            await asyncio.sleep(CONNECTION_LEASE_S / 3)
            try:
                await self.admission.keep_connection(self.tenant, self.holder)
                if self._admitted is not None:
                    await self.admission.keep_response(self.tenant, self._admitted)
            except SwitchboardError as exc:
                log.warning("connection slot not renewed", extra={**self._log, "code": exc.name})

    async def _keep_session_lease(self) -> None:
        """Renew the session's writer lease; hand the session over when another
        connection asks for it (after the running turn)."""
        while True:
            await asyncio.sleep(min(self.session_lease_s / 3, 1.0))
            try:
                wanted = await self.writer.renew()
            except SessionTakenOver:
                self._taken_over()
                return
            except SwitchboardError as exc:
                log.warning("session lease not renewed", extra={**self._log, "code": exc.name})
                continue
            if wanted:
                log.info("session handed over", extra=self._log)
                self._end_with_error(_TAKEN_OVER, "taken_over")

    async def _watch_time_limits(self) -> None:
        """Close an idle connection (4010), or one past the tenant's session length
        (4011), once no response runs."""
        max_session_s = self.tenant.limits.max_session_seconds
        while self._ending is None:
            await asyncio.sleep(1.0)
            if self._response_task is not None and not self._response_task.done():
                continue
            now = time.monotonic()
            if max_session_s and now - self.opened_at >= max_session_s:
                self._end_with_error(
                    SwitchboardError(
                        f"The session reached its maximum length of {max_session_s} s.",
                        code=common_pb2.ERROR_CODE_SESSION_EXPIRED,
                    ),
                    "session_expired",
                )
            elif self.idle_timeout_s and now - self._last_client_event >= self.idle_timeout_s:
                self._end_with_error(
                    SwitchboardError(
                        f"No client event for {self.idle_timeout_s:g} s.",
                        code=common_pb2.ERROR_CODE_IDLE_TIMEOUT,
                    ),
                    "idle",
                )
            await self._flush()

    def _taken_over(self) -> None:
        """Another connection holds the session: stop at once, sending nothing more."""
        if self.end_reason == "taken_over":
            return
        log.info("session taken over", extra=self._log)
        self.end_reason = "taken_over"
        self._ending = (_TAKEN_OVER.spec.close_code or 4509, _TAKEN_OVER.name)
        if self._response_task is not None:
            self._response_task.cancel()
        self.outbox.abort()

    # --- sending ---------------------------------------------------------------------

    async def _flush(self) -> None:
        """Move the protocol's queued events to the outbox, in order. Never waits on
        the client (it is async so that callers may yield to the writer)."""
        self._queue_events()

    def _queue_events(self) -> None:
        for event in self.protocol.take_events():
            kind = event["type"]
            if kind in _DELTAS:
                self._timed_delta()
            elif kind == "error":
                self.metrics.errors.labels(event["error"]["code"]).inc()
            try:
                self.outbox.put(event)
            except SlowConsumer as exc:
                self._slow_consumer(exc)

    def _slow_consumer(self, exc: SlowConsumer) -> None:
        """Cut a client that fell too far behind (4008): it resumes from the log,
        where what it missed (and the rest of the running response) is recorded."""
        self.end_reason = "slow_consumer"
        log.warning(
            "slow consumer",
            extra={**self._log, "detail": str(exc), "waiting_events": len(self.outbox)},
        )
        self.attached = False
        self._cut.set()
        self.outbox.max_bytes = _DETACHED_MAX_BYTES
        self._ending = (SLOW_CONSUMER_CLOSE, "slow_consumer")
        if self._sending and self._writer is not None:
            # Stuck on the client's full socket: what it was sending is recorded.
            self._writer.cancel()
        # The close frame itself may wait until the client reads again (or the
        # heartbeat gives up on it).
        self._closer = asyncio.create_task(self._close_socket(SLOW_CONSUMER_CLOSE, "slow_consumer"))

    async def _close_socket(self, code: int, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.websocket.close(code=code, reason=reason)

    async def _write_loop(self) -> None:
        """Record each batch of events in the session's log, then send it."""
        while True:
            batch = await self.outbox.get_batch()
            if batch is None:
                if self.end_reason == "taken_over" and self.attached:
                    await close_with_error(self.websocket, _TAKEN_OVER)
                return
            if isinstance(batch, Close):
                if self.attached:
                    await self._close_socket(batch.code, batch.reason)
                return
            try:
                await self.writer.record(batch)
            except SessionTakenOver:
                self._taken_over()
                continue
            except SwitchboardError as exc:
                # Serving goes on; only a resume across these events could miss them.
                if not self._unrecorded_warned:
                    log.warning("events not recorded", extra={**self._log, "code": exc.name})
                    self._unrecorded_warned = True
            if not self.attached:
                continue
            self._sending = True
            try:
                for _, text in batch:
                    await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                # The client is gone; the reader sees the disconnect. Keep recording.
                self.attached = False
            finally:
                self._sending = False

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
                    self.tenant.route(command.config.model)  # model_not_allowed
                    await self.backends.update_session(tenant, session, command.config)
                    self.protocol.session_updated(command)
                case DeleteItem():
                    await self.backends.delete_item(tenant, session, command.item_id)
                    self.protocol.item_deleted(command.item_id)
                case RetrieveItem():
                    item = await self.backends.get_item(tenant, session, command.item_id)
                    self.protocol.item_retrieved(item)
                case StartResponse():
                    self._start_turn(command)
                case CancelResponse():
                    if self._response_task is not None and self._cancellable == command.response_id:
                        self._cancel_requested = command.response_id
                        self._cancel_reason = "client_cancelled"
                        self._response_task.cancel()
        except SwitchboardError as error:
            self.protocol.fail(error, command.client_event_id)
        await self._flush()

    def _start_turn(self, command: StartResponse, reattach: Reattach | None = None) -> None:
        self._response_task = asyncio.create_task(self._run_turn(command, reattach))
        self._response_task.add_done_callback(self._turn_ended)

    async def _run_turn(self, command: StartResponse, reattach: Reattach | None) -> None:
        """A turn, as the root span of a trace of its own (gateway/spans.py)."""
        ids = (self.tenant.id, self.session_id, self.holder, command.response_id, command.model)
        with spans.turn(*ids):
            await self._run_rounds(command, reattach)

    async def _run_rounds(self, command: StartResponse, reattach: Reattach | None) -> None:
        """Run a response (the first one re-attached, when given); while it ends in
        server-side function calls, run them and start the follow-up response, up
        to `max_tool_rounds` rounds."""
        for round_number in range(self.max_tool_rounds + 1):
            ids = (self.tenant.id, self.session_id, command.response_id, command.model)
            with spans.response(*ids):
                calls = await self._run_response(command, reattach)
            reattach = None
            # Calls to tools the client declared are the client's to run; toolexec
            # answers every other name (an unknown or forbidden tool is an outcome).
            client_tools = {tool.name for tool in command.tools}
            server_calls = [c for c in calls if c.name not in client_tools]
            if not server_calls:
                return
            if round_number == self.max_tool_rounds:
                self.protocol.fail(
                    SwitchboardError(
                        f"Stopped after {self.max_tool_rounds} rounds of server-side tool "
                        "calls in one turn.",
                        code=common_pb2.ERROR_CODE_TOOL_ROUNDS_EXCEEDED,
                    )
                )
                await self._flush()
                return
            self.protocol.tools_running = True
            try:
                await self._run_tools(server_calls)
            finally:
                self.protocol.tools_running = False
            if len(server_calls) < len(calls):
                # The client runs the other calls and asks for the next response itself.
                return
            command = self.protocol.follow_up(command)
            await self._flush()

    async def _run_response(
        self, command: StartResponse, reattach: Reattach | None = None
    ) -> list[common_pb2.Item]:
        """Stream one response from the broker and finish it, whatever happens.

        Args:
            reattach: the response is one a gateway that died left streaming; its
                model call is followed at its broker, not started.

        Returns:
            The function calls of a completed response (empty otherwise).
        """
        response_id = command.response_id
        self._asked_at = time.monotonic()
        # A re-attached response has no time to first token to observe.
        self._last_delta_at = None if reattach is None else self._asked_at
        broker = "" if reattach is None else reattach.broker
        status, reason = "completed", None
        error: SwitchboardError | None = None
        usage: common_pb2.Usage | None = None
        prompt_tokens = 0
        admitted: Admitted | None = None
        max_output_tokens = self._output_cap(command.max_output_tokens)
        self._cancellable = response_id
        try:
            if reattach is None:
                context = await self.backends.build_context(self.tenant.id, self.session_id)
                if command.instructions is not None:
                    context.instructions = command.instructions
                prompt_tokens = context.estimated_tokens
                admitted = await self.admission.start_response(
                    self.tenant,
                    response_id,
                    prompt_tokens=prompt_tokens,
                    max_output_tokens=max_output_tokens,
                )
                request = broker_pb2.GenerateRequest(
                    tenant_id=self.tenant.id,
                    session_id=self.session_id,
                    response_id=response_id,
                    model=command.model,
                    context=context,
                    tools=await self._offered_tools(command),
                    tool_choice=command.tool_choice,
                    max_output_tokens=max_output_tokens,
                )
                call = self.backends.generate(request)
            else:
                admitted = self.admission.adopt(self.tenant, response_id)
                call = self.backends.attach(broker, self.tenant.id, response_id)
            self._admitted = admitted
            try:
                broker = await self._broker_of(call, response_id) or broker
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "text_delta":
                        self.protocol.text_delta(response_id, event.text_delta.text)
                        await self._flush()
                    elif kind == "tool_call_delta":
                        delta = event.tool_call_delta
                        self.protocol.call_delta(
                            response_id, delta.index, delta.call_id, delta.name, delta.arguments
                        )
                        await self._flush()
                    elif kind == "finished":
                        usage = event.finished.usage
                        status, reason = _FINISH.get(event.finished.reason, ("completed", None))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, service="broker")
                if error.code == common_pb2.ERROR_CODE_SESSION_TAKEN_OVER:
                    # A resume elsewhere re-attached to the call (this connection's
                    # lease had lapsed): the response is that connection's now.
                    self._taken_over()
                    raise asyncio.CancelledError from None
                if reattach is not None and error.code in _NOT_REATTACHED:
                    error = _NOT_RECOVERED
                raise error from None
            finally:
                if self._cancel_requested == response_id:
                    # On purpose: the broker stops it, rather than keep it for a resume.
                    self.backends.cancel_generate(broker, self.tenant.id, response_id)
                call.cancel()
        except asyncio.CancelledError:
            if self._cancel_requested != response_id:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            status, reason = "cancelled", self._cancel_reason
        except SwitchboardError as exc:
            status, error = "failed", exc
            log.warning("response failed", extra={**self._log, "code": exc.name})
        finally:
            self._cancellable = None
            self._admitted = None
        if usage is None:
            usage = estimate_usage(prompt_tokens, self.protocol.generated_chars(response_id))
        if admitted is not None:
            try:
                await self.admission.finish_response(self.tenant, admitted, usage.total_tokens)
            except SwitchboardError as exc:
                log.warning("usage not settled", extra={**self._log, "code": exc.name})
        output = self.protocol.complete_output(response_id, complete=status == "completed")
        for item in output:
            try:
                await self.backends.append_item(self.tenant.id, self.session_id, item)
            except SwitchboardError as exc:
                self.protocol.fail(exc)
        self.protocol.response_done(
            response_id, status=status, usage=usage, reason=reason, error=error
        )
        self._count_response(status, usage, error)
        spans.response_done(status, reason, usage, error)
        try:
            rate_limits = await self.admission.rate_limits(self.tenant)
        except SwitchboardError:
            rate_limits = None
        if rate_limits is not None:
            self.protocol.rate_limits_updated(rate_limits)
        await self._flush()
        close_code = error.spec.close_code if error is not None else None
        if error is not None and close_code is not None and errors.close_is_terminal(close_code):
            # A terminal refusal (the daily budget is spent): nothing more can be
            # served on this connection, so it ends with the documented code.
            self.end_reason = refusal_reason(error.name)
            self.outbox.close(close_code, error.name)
        if status != "completed":
            return []
        return [item for item in output if item.type == common_pb2.ITEM_TYPE_FUNCTION_CALL]

    async def _broker_of(self, call: grpc.aio.UnaryStreamCall, response_id: str) -> str:
        """The broker holding the model call, as it names itself at the call's start
        (""; when it does not), noted in the session for a resume after this
        gateway dies."""
        metadata = await call.initial_metadata()
        broker = str(dict(metadata or ()).get(BROKER_METADATA_KEY, ""))
        if broker:
            self.backends.spawn(self._note_broker(response_id, broker))
        return broker

    async def _note_broker(self, response_id: str, broker: str) -> None:
        try:
            await self.writer.note_broker(response_id, broker)
        except SwitchboardError as exc:
            # Only a resume after this gateway dies needs it (it then re-attaches
            # at the broker target it knows, or ends the response interrupted).
            log.info("broker not noted", extra={**self._log, "code": exc.name})

    def _count_response(
        self, status: str, usage: common_pb2.Usage, error: SwitchboardError | None
    ) -> None:
        model = self._model_label
        metrics = self.metrics
        metrics.responses.labels(model, status).inc()
        metrics.response_duration.labels(model, status).observe(time.monotonic() - self._asked_at)
        metrics.tokens.labels(model, "input").inc(usage.input_tokens)
        metrics.tokens.labels(model, "output").inc(usage.output_tokens)
        if error is not None and refusal_reason(error.name) == "quota":
            metrics.rejections.labels(error.name, self.tenant.tier).inc()

    def _output_cap(self, requested: int) -> int:
        """The response's output tokens: what was asked (0 = no limit), within the
        tenant's `max_output_tokens`."""
        limit = self.tenant.limits.max_output_tokens
        if limit is None:
            return requested
        return min(requested, limit) if requested else limit

    # --- server-side tools -------------------------------------------------------------

    async def _server_tools(self) -> dict[str, common_pb2.ToolDefinition]:
        """The tenant's toolexec tools, cached for a minute. Without toolexec, none."""
        now = time.monotonic()
        if self._server_tool_cache is None or now - self._server_tool_cache[0] > 60:
            try:
                tools = await self.backends.list_tools(self.tenant.id)
            except SwitchboardError as exc:
                log.warning("server tools unavailable", extra={**self._log, "code": exc.name})
                return {}
            self._server_tool_cache = (now, {tool.name: tool for tool in tools})
        return self._server_tool_cache[1]

    async def _offered_tools(self, command: StartResponse) -> list[common_pb2.ToolDefinition]:
        """Client tools plus the tenant's server tools; a client tool of the same name wins."""
        offered = list(command.tools)
        names = {tool.name for tool in offered}
        server = await self._server_tools()
        offered.extend(tool for name, tool in server.items() if name not in names)
        return offered

    async def _run_tools(self, calls: list[common_pb2.Item]) -> None:
        """Run server-side calls in parallel; add each output to the conversation."""
        results = await asyncio.gather(
            *(
                self.backends.execute_tool(
                    self.tenant.id, self.session_id, call.call_id, call.name, call.arguments
                )
                for call in calls
            )
        )
        for call, result in zip(calls, results, strict=True):
            if result.outcome != toolexec_pb2.TOOL_OUTCOME_OK:
                # The model gets the error as the tool's output, to recover from it;
                # the client is told too.
                self.protocol.fail(
                    SwitchboardError(
                        f"Tool '{call.name}' ({call.call_id}) failed: {result.error_message}",
                        code=result.error_code or common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED,
                        param=call.call_id,
                    )
                )
            item = common_pb2.Item(
                id=self.protocol.ids.new("item"),
                type=common_pb2.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
                status=common_pb2.ITEM_STATUS_COMPLETED,
                call_id=call.call_id,
                output=result.output,
            )
            try:
                stored = await self.backends.append_item(self.tenant.id, self.session_id, item)
            except SwitchboardError as exc:
                self.protocol.fail(exc)
                continue
            self.protocol.item_added(stored.item, stored.previous_item_id)
            await self._flush()


async def close_with_error(websocket: WebSocket, error: SwitchboardError) -> None:
    """End an accepted connection: the `error` event, then the error's close code.
    (Not through the outbox: the event is not part of the session's log.)"""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(
            {"type": "error", "event_id": "", "error": error.to_event_error(None)}
        )
        await websocket.close(code=error.spec.close_code or 1011, reason=error.name)
