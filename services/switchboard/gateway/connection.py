"""The asyncio pump between one client WebSocket and its `RealtimeProtocol`.

The pump only moves frames and keeps the connection's lifetime; turns are the
`TurnRunner`'s (turns.py). Its lifecycle:

1. `run()`, given an open protocol (`RealtimeProtocol.open`), sends what it
   queued (`session.created` for a new session), starts the writer and a
   helper (the tenant's connection slot), holds the session's writer lease in
   the gateway's renewals (leases.py), whose tick also runs its idle and
   session-length timers, and starts the turn a dead gateway left open, if it
   was handed one.
2. It reads frames until the client leaves or the connection must end. Each
   frame goes to the protocol; the commands it returns run against the
   backends, a `StartResponse` as a turn.
3. Events the protocol queues go into a bounded `Outbox` (`publish`). The writer
   records each batch in the session's event log (eventlog.py), then sends it.
   The events of a client's item and of the response it asks for right behind
   it wait for the response's first output (`_hold`), at most
   `turns.BEFORE_OUTPUT_S`: recorded meanwhile, they would compete for the CPU
   with the model call's start.
   A client that reads slowly gets merged deltas; one that falls too far behind
   is cut with 4008 `slow_consumer` and the connection goes on "detached",
   recording without sending.
4. When the client is gone (or cut), a running turn may finish detached within
   the disconnect grace (a resume follows it from the log); then it ends
   `cancelled` with reason `client_disconnected`. The writer records what is
   left and the session's lease is released.

A connection also ends after its running turn when it drains (1012), idles
(4010) or reaches the tenant's session length (4011); at once when another
connection takes the session over (4509) or a refusal is terminal (4529: the
budget is spent). Close codes: docs/errors.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from switchboard.config import GatewaySettings
from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.commands import (
    CancelResponse,
    Command,
    DeleteItem,
    RetrieveItem,
    StartResponse,
    StoreItem,
    UpdateSession,
)
from switchboard.gateway.eventlog import EventRecorder, SessionWriter
from switchboard.gateway.leases import Lease, LeaseRenewals, Outcome
from switchboard.gateway.metrics import GatewayMetrics, refusal_reason
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.sender import (
    SLOW_CONSUMER_CLOSE,
    TAKEN_OVER,
    TAKEN_OVER_CLOSE,
    ClientSocket,
    Sender,
)
from switchboard.gateway.server_tools import ToolCatalogues
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.turns import BEFORE_OUTPUT_S, Reattach, TurnRunner
from switchboard.tenancy import Tenant
from switchboard.v1 import common_pb2, session_pb2

log = logging.getLogger(__name__)

# A gateway that drains closes its connections with 1012 "service restart".
DRAIN_CLOSE = 1012


class RealtimeConnection:
    """One client's WebSocket connection; see the module docstring."""

    def __init__(
        self,
        websocket: ClientSocket,
        protocol: RealtimeProtocol,
        backends: Backends,
        tenant: Tenant,
        gate: TenantGate,
        metrics: GatewayMetrics,
        recorder: EventRecorder,
        leases: LeaseRenewals,
        settings: GatewaySettings,
        *,
        holder: str,
        catalogues: ToolCatalogues | None = None,
    ) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.backends = backends
        self.tenant = tenant
        self.gate = gate
        self.metrics = metrics
        # Who holds this connection's slot in the limits store and the session's lease.
        self.holder = holder
        self.session_id = protocol.session_id
        self.disconnect_grace_s = settings.disconnect_grace_s
        self.idle_timeout_s = settings.idle_timeout_s
        self.lease_s = settings.session_lease_s
        self.leases = leases
        self._lease: Lease | None = None
        self._lease_failing = False
        self.log_writer = SessionWriter(
            backends, recorder, tenant.id, self.session_id, holder, self.lease_s
        )
        self.sender = Sender(
            websocket,
            self.log_writer,
            max_bytes=settings.max_buffered_bytes,
            on_cut=self._cut_off,
            on_taken_over=self._taken_over,
            checkpoint_s=settings.checkpoint_s,
        )
        self.turns = TurnRunner(
            protocol,
            backends,
            gate,
            metrics,
            tenant,
            self.log_writer,
            publish=self.publish,
            on_refused=self._refused,
            on_taken_over=self._taken_over,
            max_tool_rounds=settings.max_tool_rounds,
            catalogues=catalogues,
            on_output=self._release,
        )
        # Why the connection ended, for the disconnects metric.
        self.end_reason = "client_closed"
        self.opened_at = self._last_client_event = time.monotonic()
        # Set when the connection must end after the running turn: (code, reason).
        self._ending: tuple[int, str] | None = None
        # Set when the gateway cuts the client (slow consumer): stop reading it.
        self._cut = asyncio.Event()
        # The context read with the item the last command stored (`_execute`).
        self._context_ahead: session_pb2.Context | None = None
        # Whether the last command stored an item (`_execute`).
        self._after_item = False
        # While set, `publish` leaves the protocol's events queued (`_hold`).
        self._held: asyncio.TimerHandle | None = None
        # Held for a stored item: until the reader finds no command behind it.
        self._item_held = False
        self._log = {"tenant_id": tenant.id, "session_id": self.session_id}

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, reattach: Reattach | None = None) -> None:
        """Serve the connection until the client leaves (or it must end), then let
        a running turn finish detached, within the disconnect grace.

        Args:
            reattach: a response to finish first, left by a gateway that died.
        """
        self.sender.start()
        lease = self._lease = self.leases.hold(
            self.log_writer,
            self._lease_renewed,
            due=self._lease_due,
            every_tick=self._check_time_limits,
        )
        helpers = [
            asyncio.create_task(self.gate.hold_connection(self.tenant, self.holder, self._log)),
        ]
        try:
            self.publish()
            if reattach is not None:
                self._start_turn(reattach.command, reattach)
            await self._read()
        finally:
            try:
                await self._end(helpers)
            finally:
                # Even when cancelled: nothing more is renewed for this connection.
                lease.stop()
                for task in helpers:
                    task.cancel()

    async def _read(self) -> None:
        """Feed client frames to the protocol until the client leaves, the writer
        stops, or the client is cut."""
        cut = asyncio.create_task(self._cut.wait())
        try:
            while not self.sender.task.done():
                receive = asyncio.ensure_future(self.websocket.receive())
                if self._item_held:
                    # A client sends `response.create` right behind its item, so
                    # its frame is read already; if none is, the item's events go.
                    await asyncio.wait((receive,), timeout=0)
                    if not receive.done():
                        self._release()
                await asyncio.wait(
                    (receive, self.sender.task, cut), return_when=asyncio.FIRST_COMPLETED
                )
                if not receive.done():
                    receive.cancel()
                    return
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    return
                self._last_client_event = time.monotonic()
                text = message.get("text")
                if text is not None:
                    commands = self.protocol.receive_text(text)
                else:
                    commands = self.protocol.receive_bytes(message.get("bytes") or b"")
                if any(isinstance(command, StartResponse) for command in commands):
                    # The item's events (if any), `response.created` and the
                    # response's first output go to the log together.
                    self._hold(BEFORE_OUTPUT_S)
                    self._item_held = False
                self.publish()
                for command in commands:
                    await self._execute(command)
        finally:
            cut.cancel()

    async def _end(self, helpers: list[asyncio.Task[None]]) -> None:
        """The client is gone: finish the turn detached, record what waits,
        release the session."""
        self._release()
        self.sender.detach()
        await self._finish_detached()
        # Waiting longer than a lease would be pointless: by then a resume
        # elsewhere owns the session.
        await self.sender.finish(timeout_s=self.lease_s)
        for task in helpers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # No renewal in flight may take the lease again after the release.
        if self._lease is not None:
            await self._lease.drop()
        try:
            await self.log_writer.release()
        except SwitchboardError as exc:
            log.warning("session lease not released", extra={**self._log, "code": exc.name})

    async def _finish_detached(self) -> None:
        """Let the running turn end within the disconnect grace; then cancel it (its
        response ends `cancelled` with reason `client_disconnected`)."""
        turn = self.turns.turn
        if turn is None or not turn.running:
            return
        if self.end_reason == "client_closed" and self._ending is None:
            log.info("client left during a response", extra=self._log)
        try:
            await asyncio.wait_for(turn.wait(), timeout=self.disconnect_grace_s)
            return
        except TimeoutError:
            pass
        turn.cancel("client_disconnected")
        await turn.wait()
        self.publish()

    def drain(self) -> None:
        """The gateway is draining: close with 1012 once the running turn ends."""
        self._end_after_turn(DRAIN_CLOSE, "draining", "drain")

    def stop_now(self) -> None:
        """The drain deadline passed: end the running response (`cancelled`, reason
        `drain`) and close with 1012; the client resumes elsewhere."""
        self.disconnect_grace_s = 0.0
        self._ending = (DRAIN_CLOSE, "draining")
        self.end_reason = "drain"
        turn = self.turns.turn
        if turn is None or not turn.cancel("drain"):
            self._close(DRAIN_CLOSE, "draining")

    def _end_after_turn(self, code: int, reason: str, end_reason: str) -> None:
        if self._ending is not None:
            return
        self._ending = (code, reason)
        self.end_reason = end_reason
        if not self.turns.running:
            self._close(code, reason)

    def _end_with_error(self, error: SwitchboardError, end_reason: str) -> None:
        """Tell the client why, then close with the error's code after the turn."""
        if self._ending is not None:
            return
        self.protocol.fail(error)
        self.publish()
        self._end_after_turn(error.spec.close_code or 1011, error.name, end_reason)

    def _session_gone(self, error: SwitchboardError, *, tell: bool) -> None:
        """The session no longer exists (expired, or its store lost it): every
        event would be refused, so end with 4504 `session_not_found` (after the
        running turn, which fails on its own)."""
        if self._ending is not None:
            return
        log.info("session gone", extra=self._log)
        if tell:
            self.protocol.fail(error)
        self.publish()
        close = error.spec.close_code or 4504
        self._end_after_turn(close, error.name, refusal_reason(error.name))

    def _refused(self, error: SwitchboardError) -> None:
        """A refusal no retry on this connection can cure: close with its code."""
        self.end_reason = refusal_reason(error.name)
        self._close(error.spec.close_code or 1011, error.name)

    def _taken_over(self) -> None:
        """Another connection holds the session: stop at once, sending nothing more."""
        if self.end_reason == "taken_over":
            return
        log.info("session taken over", extra=self._log)
        self.end_reason = "taken_over"
        self._ending = (TAKEN_OVER_CLOSE, TAKEN_OVER.name)
        if self.turns.turn is not None:
            self.turns.turn.abandon()
        if self._held is not None:  # nothing more is sent
            self._held.cancel()
            self._held = None
        self.sender.taken_over()

    # --- helpers: slot, lease, timers ---------------------------------------------------

    def _lease_due(self) -> bool:
        """Whether this tick's lease renewal is needed: not while a turn runs and
        its appends renew the lease (a hand-over waits for the turn's end anyway:
        the first renewal after it asks)."""
        return not (self.turns.running and self.log_writer.appended_within(self.leases.interval_s))

    def _lease_renewed(self, outcome: Outcome) -> None:
        """A renewal of the session's writer lease (leases.py) answered: hand the
        session over when another connection asks for it (after the running
        turn); close with 4509 when it was taken, 4504 when the session is gone
        (its store lost it)."""
        assert self._lease is not None, "renewed before it was held"
        if isinstance(outcome, SessionTakenOver):
            self._lease.stop()
            self._taken_over()
            return
        if isinstance(outcome, SwitchboardError):
            if outcome.code == common_pb2.ERROR_CODE_SESSION_NOT_FOUND:
                self._lease.stop()
                self._session_gone(outcome, tell=True)
                return
            if not self._lease_failing:  # once per outage, not once a second
                log.warning("session lease not renewed", extra={**self._log, "code": outcome.name})
            self._lease_failing = True
            return
        if self._lease_failing:
            log.info("session lease renewed again", extra=self._log)
            self._lease_failing = False
        if outcome:
            # The `session_taken_over` error is for this connection's client
            # only: it is sent with the close (sender.py), never recorded, or
            # the resuming client would be replayed it.
            log.info("session handed over", extra=self._log)
            self._end_after_turn(TAKEN_OVER_CLOSE, TAKEN_OVER.name, "taken_over")

    def _check_time_limits(self) -> None:
        """At each tick of the lease renewals (at most 1 s apart): close an idle
        connection (4010), or one past the tenant's session length (4011), once
        no turn runs."""
        if self._ending is not None or self.turns.running:
            return
        max_session_s = self.tenant.limits.max_session_seconds
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

    # --- sending ------------------------------------------------------------------------

    def publish(self) -> None:
        """Move the protocol's queued events to the sender, in order (unless they
        are held: `_hold`). Never waits on the client: a client too far behind is
        cut instead."""
        if self._held is not None:
            return
        for event in self.protocol.take_events():
            if event["type"] == "error":
                self.metrics.errors.labels(event["error"]["code"]).inc()
            self.sender.put(event)

    def _hold(self, seconds: float) -> None:
        """Keep the protocol's events from the sender until `_release`, or for
        `seconds` at most (one hold at a time: a new one replaces the last).

        Held from a client's item being stored (while the reader finds a command
        behind it: `_read`) or a `response.create` to the response's first output,
        they are recorded in one append with that output (eventlog.py) instead of
        while the model call starts: on a busy core that work is what the call's
        start would wait for. Nothing is sent out of order, and nothing is sent
        before it is recorded; a response whose item was not stored never starts
        (its `response.create` comes after the item's error)."""
        if self._held is not None:
            self._held.cancel()
        self._held = asyncio.get_running_loop().call_later(seconds, self._release)

    def _release(self) -> None:
        """End the hold, if any: what waits goes to the sender."""
        held, self._held = self._held, None
        self._item_held = False
        if held is not None:
            held.cancel()
            self.publish()

    def _close(self, code: int, reason: str) -> None:
        """Close the socket with `code`, after what is held (`_hold`)."""
        self._release()
        self.sender.close(code, reason)

    def _cut_off(self) -> None:
        """The sender cut a slow consumer (4008): stop reading it; the connection
        goes on detached, and a resume finds the rest in the log."""
        self.end_reason = "slow_consumer"
        self._ending = (SLOW_CONSUMER_CLOSE, "slow_consumer")
        self._cut.set()

    # --- commands -----------------------------------------------------------------------

    async def _execute(self, command: Command) -> None:
        tenant, session = self.tenant.id, self.session_id
        # The context read with the item stored by the command just before serves a
        # response asked for right after it; any other command may change it.
        ahead, self._context_ahead = self._context_ahead, None
        after_item, self._after_item = self._after_item, isinstance(command, StoreItem)
        if not isinstance(command, StartResponse):
            self._release()
        try:
            match command:
                case StoreItem():
                    # A flagged user message is refused here, before it is stored.
                    await self.turns.moderator.check_item(command.item)
                    # Only the first item of a run reads the context along: a
                    # client seeding a history item by item would otherwise read
                    # the whole conversation once per item.
                    budget = None if after_item else self.turns.context_budget_ahead()
                    stored = await self.backends.append_item(
                        tenant,
                        session,
                        command.item,
                        command.previous_item_id,
                        context_tokens=budget,
                    )
                    self.protocol.item_added(stored.item, stored.previous_item_id)
                    if stored.HasField("context"):
                        self._context_ahead = stored.context
                    # For a `response.create` right behind it (`_read`).
                    self._hold(BEFORE_OUTPUT_S)
                    self._item_held = True
                case UpdateSession():
                    self.tenant.route(command.config.model)  # model_not_allowed
                    await self.backends.update_session(tenant, session, command.config)
                    self.protocol.session_updated(command)
                    if command.config.mcp_tools:
                        # Listed in the background; a response.create meanwhile waits for it.
                        self.publish()
                        self.backends.spawn(self.turns.mcp.list_new(command.config.mcp_tools))
                case DeleteItem():
                    await self.backends.delete_item(tenant, session, command.item_id)
                    self.protocol.item_deleted(command.item_id)
                case RetrieveItem():
                    item = await self.backends.get_item(tenant, session, command.item_id)
                    self.protocol.item_retrieved(item)
                case StartResponse():
                    self._start_turn(command, context=ahead)
                case CancelResponse():
                    if self.turns.turn is not None:
                        self.turns.turn.cancel("client_cancelled", command.response_id)
        except SwitchboardError as error:
            self.protocol.fail(error, command.client_event_id)
            if error.code == common_pb2.ERROR_CODE_SESSION_NOT_FOUND:
                self._session_gone(error, tell=False)
        self.publish()

    def _start_turn(
        self,
        command: StartResponse,
        reattach: Reattach | None = None,
        context: session_pb2.Context | None = None,
    ) -> None:
        turn = self.turns.start(command, reattach, context)
        assert turn.task is not None
        turn.task.add_done_callback(self._turn_ended)

    def _turn_ended(self, task: asyncio.Task[None]) -> None:
        self._release()
        if self._ending is not None:
            self.sender.close(*self._ending)
