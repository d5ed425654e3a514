"""Turns: from `response.create` to the end of the turn's last response, apart
from any transport.

A turn runs one response; while a response ends in server-side function calls,
it runs them (toolexec) and starts the follow-up response, up to
`max_tool_rounds` rounds. Each response goes: the context from the session ->
the tenant gate (limits, token reservation) -> the model stream from the broker
(or a re-attach to the call a dead gateway left) -> its output, delta by delta,
into the protocol -> its items stored -> usage settled -> `response.done` and
`rate_limits.updated`. Every step ends the response with the documented status,
whatever fails.

The runner talks to the outside only through the protocol core, whose events
it asks its transport to `publish`, and through the backends; it knows nothing
of WebSockets. A transport (the WebSocket pump, an SSE stream) sees a turn
through one seam: `TurnRunner.start()` returns a `Turn`, which it may
`cancel()` with a reason, `abandon()`, or await (`wait()`); per-turn state lives
on the `Turn`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Histogram

from switchboard import errors
from switchboard.errors import SwitchboardError
from switchboard.gateway import spans
from switchboard.gateway.backends import Backends, ModelCall
from switchboard.gateway.commands import StartResponse
from switchboard.gateway.eventlog import SessionWriter
from switchboard.gateway.mcp_session import McpSession
from switchboard.gateway.metrics import GatewayMetrics, refusal_reason
from switchboard.gateway.moderation import ContentFiltered, Moderator
from switchboard.gateway.protocol import RealtimeProtocol, finish_status
from switchboard.gateway.server_tools import ServerTools, ToolCatalogues, server_calls
from switchboard.gateway.summaries import Summaries
from switchboard.gateway.tenant_gate import RESPONSE_LEASE_S, Admitted, TenantGate
from switchboard.limits.ledger import usd
from switchboard.tenancy import Tenant
from switchboard.tokens import estimated_usage
from switchboard.v1 import broker_pb2, common_pb2, session_pb2

log = logging.getLogger(__name__)

_NOT_RECOVERED = SwitchboardError(
    "The gateway running this response stopped, and its model call could not be taken "
    "up again; the text sent so far is kept as an incomplete item. Ask again with "
    "response.create.",
    code=common_pb2.ERROR_CODE_RESPONSE_INTERRUPTED,
)
# How long the events before a response's first output (`response.created`,
# and the client's item's before it) may wait for it, to be recorded and sent
# with it (`TurnRunner`'s `on_output`; connection.py, sse.py): recorded while
# the model call starts, they would compete with it for the CPU.
BEFORE_OUTPUT_S = 0.02
# How long the note of the broker holding a response's model call waits to go
# with the connection's next append of events (its first output's, usually)
# before it is appended alone.
NOTE_BROKER_WAIT_S = 0.05
# What a broker answers an Attach with when the call is gone (or the broker is):
# the response cannot be finished.
_NOT_REATTACHED = frozenset(
    {common_pb2.ERROR_CODE_RESPONSE_INTERRUPTED, common_pb2.ERROR_CODE_SERVICE_UNAVAILABLE}
)


def context_budget_ahead(tenant: Tenant) -> int | None:
    """The budget of a context read with a stored item for the response that
    follows (`TurnRunner.start`'s `context`); None when the tenant summarises
    (the response's context may need a summary written first)."""
    policy = tenant.summaries
    return None if policy.enabled else policy.context_tokens


@dataclass(frozen=True, slots=True)
class Reattach:
    """A response another gateway left streaming when it died, to finish here: the
    rest of its turn, and the broker that holds its model call ("": unknown)."""

    command: StartResponse
    broker: str


class Turn:
    """One running turn and its state. Made by `TurnRunner.start`."""

    def __init__(
        self,
        command: StartResponse,
        reattach: Reattach | None,
        context: session_pb2.Context | None = None,
    ) -> None:
        self.command = command
        self.reattach = reattach
        # The context read with the client's item stored just before (its first
        # response's, unless something was stored since: `TurnRunner._open_call`).
        self.context = context
        self.task: asyncio.Task[None] | None = None
        # The response that may be cancelled now (None while it is finishing, so
        # that a late cancel cannot interrupt storing its items).
        self.cancellable: str | None = None
        # The response stopped on purpose, and why (its `status_details.reason`).
        self.cancel_requested: str | None = None
        self.cancel_reason = "client_cancelled"
        # The running response's admission, whose slot is renewed while it runs.
        self.admitted: Admitted | None = None
        # When the running response was asked for, and when its last delta went out.
        self.asked_at = 0.0
        self.last_delta_at: float | None = None
        # The running response's inter-token histogram (its model's label, looked
        # up once a response rather than once a delta).
        self.inter_token: Histogram | None = None
        # The error that failed the turn's last failed response (its retry_after
        # included), for a transport that answers with an HTTP status.
        self.failure: SwitchboardError | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def cancel(self, reason: str, response_id: str | None = None) -> bool:
        """Stop the turn on purpose: its streaming response ends `cancelled` with
        `reason`, and its model call is cancelled at the broker.

        Args:
            response_id: only if this is the response streaming now.

        Returns:
            False when there was nothing to cancel.
        """
        if not self.running or (response_id is not None and self.cancellable != response_id):
            return False
        if self.cancellable is not None:
            self.cancel_requested = self.cancellable
            self.cancel_reason = reason
        assert self.task is not None
        self.task.cancel()
        return True

    def abandon(self) -> None:
        """Stop at once, finishing nothing: the session is another connection's now,
        which finishes the response (the model call is left for it to attach to)."""
        if self.task is not None:
            self.task.cancel()

    async def wait(self) -> None:
        """Until the turn has ended, however it ended (never raises what the turn
        raised; cancelling the waiter does not cancel the turn)."""
        if self.task is not None:
            await asyncio.wait([self.task])


@dataclass(slots=True)
class _Outcome:
    """How a response ended, filled in as it runs."""

    status: str = "completed"
    reason: str | None = None
    error: SwitchboardError | None = None
    usage: common_pb2.Usage | None = None
    prompt_tokens: int = 0
    admitted: Admitted | None = field(default=None)
    # The model the upstream served the response as (the broker's `Started`).
    upstream_model: str = ""


class TurnRunner:
    """Runs the turns of one session, one at a time.

    Args:
        publish: called whenever the protocol has queued events to send.
        on_refused: a refusal no retry can cure (the budget is spent) ended a
            response; the transport ends with the error's close code.
        on_taken_over: another connection took the session over (this one's
            lease had lapsed): stop, sending nothing more.
        catalogues: the tenants' tool catalogues the gateway's sessions share
            (by default, this runner's own).
        on_output: called when a response's model call has its first event
            other than `started` (its first output, or its end), after that
            event reached the protocol.
    """

    def __init__(
        self,
        protocol: RealtimeProtocol,
        backends: Backends,
        gate: TenantGate,
        metrics: GatewayMetrics,
        tenant: Tenant,
        writer: SessionWriter,
        *,
        publish: Callable[[], None],
        on_refused: Callable[[SwitchboardError], None],
        on_taken_over: Callable[[], None],
        max_tool_rounds: int,
        catalogues: ToolCatalogues | None = None,
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.protocol = protocol
        self.backends = backends
        self.gate = gate
        self.metrics = metrics
        self.tenant = tenant
        self.writer = writer
        self.session_id = protocol.session_id
        self.tools = ServerTools(backends, tenant.id, self.session_id, catalogues)
        self.mcp = McpSession(protocol, backends, tenant.id, publish=publish)
        self.summaries = Summaries(
            backends, tenant, self.session_id, metrics.summaries, protocol.ids
        )
        self.moderator = Moderator(
            backends, tenant.id, self.session_id, tenant.moderation, metrics.moderation
        )
        self.publish = publish
        self.on_refused = on_refused
        self.on_taken_over = on_taken_over
        self.on_output = on_output
        self.max_tool_rounds = max_tool_rounds
        self.turn: Turn | None = None
        self._log = {"tenant_id": tenant.id, "session_id": self.session_id}

    @property
    def running(self) -> bool:
        return self.turn is not None and self.turn.running

    def start(
        self,
        command: StartResponse,
        reattach: Reattach | None = None,
        context: session_pb2.Context | None = None,
    ) -> Turn:
        """Run the turn that `command` (from `response.create`, or `reopen`) starts.

        Args:
            context: the session's context as the client's item stored just before
                left it (`append_item` with `context_budget_ahead()`), read in the
                same round trip as that item; nothing may have been stored since.
        """
        if self.running:
            raise RuntimeError("a turn is already running")
        turn = self.turn = Turn(command, reattach, context)
        turn.task = asyncio.create_task(self._run(turn))
        turn.task.add_done_callback(self._ended)
        return turn

    def context_budget_ahead(self) -> int | None:
        """The budget of the context to read with a client's item as it is stored
        (`Backends.append_item`'s `context_tokens`), for a response asked for next;
        None when such a response builds its own: a turn is running (it stores its
        output after the item), the tenant summarises (a summary may be written
        first), or an MCP listing is running (it stores its item after)."""
        if self.running or self.mcp.listing:
            return None
        return context_budget_ahead(self.tenant)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug: logged with its traceback. The response it left open ends
        # `failed` with `internal_error`, so that its client is not left waiting
        # for `response.done` and the session can take the next response; the
        # connection goes on.
        log.error("turn failed", extra=self._log, exc_info=task.exception())
        response = self.protocol.response
        if response is None:
            return
        error = errors.InternalError("The response failed on an internal error.")
        self.protocol.response_done(
            response.id, status="failed", usage=common_pb2.Usage(), error=error
        )
        self.publish()

    async def _run(self, turn: Turn) -> None:
        """The turn, as the root span of a trace of its own (gateway/spans.py)."""
        command = turn.command
        ids = (self.tenant.id, self.session_id, self.writer.holder, command.response_id)
        renewer = asyncio.create_task(self._keep_slot(turn))
        try:
            with spans.turn(*ids, command.model):
                await self._rounds(turn)
        finally:
            renewer.cancel()

    async def _keep_slot(self, turn: Turn) -> None:
        """Renew the running response's slot while it runs (a gateway that dies
        frees it within `RESPONSE_LEASE_S`)."""
        while True:
            await asyncio.sleep(RESPONSE_LEASE_S / 3)
            if turn.admitted is None:
                continue
            try:
                await self.gate.keep_response(self.tenant, turn.admitted)
            except SwitchboardError as exc:
                log.warning("response slot not renewed", extra={**self._log, "code": exc.name})

    async def _rounds(self, turn: Turn) -> None:
        """Run a response (the first one re-attached, when given); while it ends in
        server-side function calls, run them and start the follow-up response, up
        to `max_tool_rounds` rounds."""
        command, reattach = turn.command, turn.reattach
        for round_number in range(self.max_tool_rounds + 1):
            ids = (self.tenant.id, self.session_id, command.response_id, command.model)
            with spans.response(*ids):
                calls = await self._respond(turn, command, reattach)
            reattach = None
            # MCP calls ran in the response; the model goes on with their results.
            mcp_ran = any(call.type == common_pb2.ITEM_TYPE_MCP_CALL for call in calls)
            functions = [call for call in calls if call.type == common_pb2.ITEM_TYPE_FUNCTION_CALL]
            # Calls to tools the client declared are the client's to run.
            ours = server_calls(functions, command.tools)
            client_runs = len(ours) < len(functions)
            if not ours and (client_runs or not mcp_ran):
                return
            if round_number == self.max_tool_rounds:
                self.protocol.fail(
                    SwitchboardError(
                        f"Stopped after {self.max_tool_rounds} rounds of server-side tool "
                        "calls in one turn.",
                        code=common_pb2.ERROR_CODE_TOOL_ROUNDS_EXCEEDED,
                    )
                )
                self.publish()
                return
            self.protocol.tools_started()
            try:
                await self._run_tools(ours)
                if client_runs:
                    # The client runs the other calls and asks for the next response.
                    return
                command = self.protocol.follow_up(command)
            finally:
                self.protocol.tools_ended()
            self.publish()

    async def _respond(
        self, turn: Turn, command: StartResponse, reattach: Reattach | None
    ) -> list[common_pb2.Item]:
        """Stream one response and finish it, whatever happens.

        Returns:
            The function calls and MCP calls of a completed response (empty otherwise).
        """
        response_id = command.response_id
        turn.asked_at = time.monotonic()
        # A re-attached response has no time to first token to observe.
        turn.last_delta_at = None if reattach is None else turn.asked_at
        turn.inter_token = self.metrics.inter_token.labels(self._model_label)
        outcome = _Outcome()
        turn.cancellable = response_id
        try:
            await self._stream(turn, command, reattach, outcome)
        except asyncio.CancelledError:
            if turn.cancel_requested != response_id:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome.status, outcome.reason = "cancelled", turn.cancel_reason
        except ContentFiltered as flagged:
            # The model call is closed (`_stream`); the text sent so far is kept.
            outcome.status, outcome.reason = "incomplete", "content_filter"
            log.info(
                "response stopped by moderation",
                extra={**self._log, "categories": flagged.categories[:5]},
            )
        except SwitchboardError as exc:
            outcome.status, outcome.error = "failed", exc
            log.warning("response failed", extra={**self._log, "code": exc.name})
        finally:
            turn.cancellable = None
            turn.admitted = None
        return await self._finish(turn, command, outcome)

    async def _open_call(
        self,
        command: StartResponse,
        reattach: Reattach | None,
        outcome: _Outcome,
        ahead: session_pb2.Context | None,
    ) -> ModelCall:
        """Admit the response and start its model call; or, for a response a dead
        gateway left, adopt its admission and re-attach to its call.

        Args:
            ahead: the context read with the client's last item (`TurnRunner.start`).
        """
        response_id = command.response_id
        if reattach is not None:
            outcome.admitted = self.gate.adopt(self.tenant, response_id)
            return self.backends.attach(reattach.broker, self.tenant.id, response_id)
        # The tenant's tools (toolexec, cached per tenant: ToolCatalogues) are fetched meanwhile.
        offered = asyncio.ensure_future(self.tools.offered(command.tools))
        try:
            # MCP servers first: their listings (a server offered for the first
            # time), and the calls the client approved, whose results the model
            # must see.
            if not self.mcp.listed(command.mcp_tools):
                ahead = None  # a listing stores its item: the context is read after it
            await self.mcp.list_new(command.mcp_tools)
            answered = await self.mcp.answer_approvals(response_id)
            context = ahead if ahead is not None else await self.summaries.context()
            context.items.extend(answered)
            if command.instructions is not None:
                context.instructions = command.instructions
            mcp_tools, mcp_names = self.mcp.offered(command.mcp_tools)
            self.protocol.mcp_output(response_id).mcp_names = mcp_names
            outcome.prompt_tokens = context.estimated_tokens
            max_output_tokens = self.gate.output_cap(self.tenant, command.max_output_tokens)
            outcome.admitted = await self.gate.admit_response(
                self.tenant,
                response_id,
                prompt_tokens=outcome.prompt_tokens,
                max_output_tokens=max_output_tokens,
                price=self.gate.price_of(self.tenant, command.model),
            )
            tools = await offered
        finally:
            offered.cancel()  # the response failed before it needed them
        request = broker_pb2.GenerateRequest(
            tenant_id=self.tenant.id,
            session_id=self.session_id,
            response_id=response_id,
            model=command.model,
            context=context,
            tools=[*tools, *mcp_tools],
            tool_choice=command.tool_choice,
            max_output_tokens=max_output_tokens,
        )
        if self.protocol.config.HasField("temperature"):
            request.temperature = self.protocol.config.temperature
        return self.backends.generate(request)

    async def _stream(
        self, turn: Turn, command: StartResponse, reattach: Reattach | None, outcome: _Outcome
    ) -> None:
        """Feed the model call's output to the protocol as it streams."""
        response_id = command.response_id
        ahead, turn.context = turn.context, None  # for the turn's first response only
        call = await self._open_call(command, reattach, outcome, ahead)
        turn.admitted = outcome.admitted
        broker = "" if reattach is None else reattach.broker

        def send_text(text: str) -> None:
            if self.protocol.text_delta(response_id, text):
                self._timed_delta(turn)
            self.publish()

        # The task this runs in: once it is being cancelled, no event reaches the
        # protocol (as none would reach a task waiting for the next one).
        task = asyncio.current_task()
        assert task is not None
        waiting = self.on_output is not None  # for the call's first output

        def output_began() -> None:
            nonlocal waiting
            waiting = False
            assert self.on_output is not None
            self.on_output()

        def on_event(event: broker_pb2.GenerateEvent) -> None:
            if task.cancelling():
                return
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                send_text(event.text_delta.text)
            elif kind == "tool_call_delta":
                delta = event.tool_call_delta
                if self.protocol.call_delta(
                    response_id, delta.index, delta.call_id, delta.name, delta.arguments
                ):
                    self._timed_delta(turn)
                self.publish()
            elif kind == "started":
                outcome.upstream_model = event.started.upstream_model
            elif kind == "finished":
                outcome.usage = event.finished.usage
                outcome.status, outcome.reason = finish_status(event.finished.reason)
            if waiting and kind != "started":
                output_began()

        # With output moderation, text reaches the client only as its checks allow.
        moderated = self.moderator.output(send_text)
        stopped = False
        try:
            broker = await call.broker() or broker
            if broker:
                self.backends.spawn(self._note_broker(response_id, broker))
            if moderated is None:
                # Each event goes to the protocol as the broker stream's reader
                # takes it: this task wakes when the call ends, not per token.
                await call.follow(on_event)
            else:
                async for event in call:
                    if event.WhichOneof("event") == "text_delta":
                        await moderated.feed(event.text_delta.text)
                        if waiting:
                            output_began()
                    else:
                        on_event(event)
                await moderated.finish()
        except ContentFiltered:
            stopped = True
            raise
        except SwitchboardError as error:
            if error.code == common_pb2.ERROR_CODE_SESSION_TAKEN_OVER:
                # A resume elsewhere re-attached to the call (this connection's
                # lease had lapsed): the response is that connection's now.
                self.on_taken_over()
                raise asyncio.CancelledError from None
            if reattach is not None and error.code in _NOT_REATTACHED:
                raise _NOT_RECOVERED from None
            raise
        finally:
            if moderated is not None:
                moderated.close()
            if stopped or turn.cancel_requested == response_id:
                # On purpose: the broker stops it, rather than keep it for a resume.
                self.backends.cancel_generate(broker, self.tenant.id, response_id)
            call.cancel()

    async def _finish(
        self, turn: Turn, command: StartResponse, outcome: _Outcome
    ) -> list[common_pb2.Item]:
        """Settle usage, store the output, and tell the client how it ended."""
        response_id, status, error = command.response_id, outcome.status, outcome.error
        usage = outcome.usage
        if usage is None:
            usage = estimated_usage(
                outcome.prompt_tokens, self.protocol.generated_chars(response_id)
            )
        # Usage is settled (limits store) while the output is stored (session
        # service): neither waits for the other.
        cost, (output, not_stored) = await asyncio.gather(
            self._settle(command, outcome, usage), self._store_output(response_id, status)
        )
        if not_stored is not None and error is None:
            # Output that is not in the conversation: the response failed
            # (docs/protocol.md), with the store's error as its reason.
            status, error = "failed", not_stored
            outcome.reason = None
        self.protocol.response_done(
            response_id, status=status, usage=usage, reason=outcome.reason, error=error
        )
        self._count_response(turn, status, usage, error, cost)
        if error is not None:
            turn.failure = error
        spans.response_done(status, outcome.reason, usage, error)
        try:
            rate_limits = await self.gate.rate_limits(self.tenant)
        except SwitchboardError:
            rate_limits = None
        if rate_limits is not None:
            self.protocol.rate_limits_updated(rate_limits)
        self.publish()
        close_code = error.spec.close_code if error is not None else None
        if error is not None and close_code is not None and errors.close_is_terminal(close_code):
            # A terminal refusal (the daily budget is spent): nothing more can be
            # served on this connection.
            self.on_refused(error)
        if status != "completed":
            return []
        calls = (common_pb2.ITEM_TYPE_FUNCTION_CALL, common_pb2.ITEM_TYPE_MCP_CALL)
        return [item for item in output if item.type in calls]

    async def _store_output(
        self, response_id: str, status: str
    ) -> tuple[list[common_pb2.Item], SwitchboardError | None]:
        """Run a completed response's MCP calls, then store its output.

        Returns:
            The output, and the store's error when not all of it was stored.
        """
        if status == "completed":
            # The model's MCP calls run now, inside the response (their items end
            # with their results).
            pending = self.protocol.mcp_output(response_id).pending_mcp_calls()
            await self.mcp.run_calls(response_id, pending)
        output = self.protocol.complete_output(response_id, complete=status == "completed")
        for item in output:
            try:
                await self.backends.append_item(self.tenant.id, self.session_id, item)
            except SwitchboardError as exc:
                log.warning("response output not stored", extra={**self._log, "code": exc.name})
                return output, exc
        return output, None

    async def _settle(
        self, command: StartResponse, outcome: _Outcome, usage: common_pb2.Usage
    ) -> int:
        """Settle an admitted response's reservation and slot, and record its cost.

        Returns:
            The cost in pico-dollars (0 when it was not recorded).
        """
        if outcome.admitted is None:
            return 0
        try:
            await self.gate.finish_response(self.tenant, outcome.admitted, usage.total_tokens)
        except SwitchboardError as exc:
            log.warning("usage not settled", extra={**self._log, "code": exc.name})
        price = self.gate.price_of(self.tenant, command.model, outcome.upstream_model)
        try:
            return await self.gate.record_cost(
                self.tenant, self.session_id, command.response_id, command.model, usage, price
            )
        except SwitchboardError as exc:
            log.warning("cost not recorded", extra={**self._log, "code": exc.name})
            return 0

    async def _run_tools(self, calls: list[common_pb2.Item]) -> None:
        """Run server-side calls in parallel; add each output to the conversation."""
        results = await self.tools.run(calls)
        for call, result in zip(calls, results, strict=True):
            item = self.protocol.tool_output(call, result)
            try:
                stored = await self.backends.append_item(self.tenant.id, self.session_id, item)
            except SwitchboardError as exc:
                self.protocol.fail(exc)
                continue
            self.protocol.item_added(stored.item, stored.previous_item_id)
            self.publish()

    async def _note_broker(self, response_id: str, broker: str) -> None:
        """Note in the session the broker holding the model call, for a resume
        after this gateway dies: with the connection's next append of events
        (the response's first, usually), or alone after `NOTE_BROKER_WAIT_S`."""
        try:
            await self.writer.note_broker(response_id, broker, wait_s=NOTE_BROKER_WAIT_S)
        except SwitchboardError as exc:
            # Only a resume after this gateway dies needs it (it then re-attaches
            # at the broker target it knows, or ends the response interrupted).
            log.info("broker not noted", extra={**self._log, "code": exc.name})

    # --- measures ----------------------------------------------------------------------

    @property
    def _model_label(self) -> str:
        """The session's model as a metric label: only models a tenants file lists
        (development tenants may send any name, which would be an unbounded label)."""
        model = self.protocol.config.model
        return model if model in self.tenant.models else "other"

    def _timed_delta(self, turn: Turn) -> None:
        """Time to first token for the first delta of a response, gaps after it."""
        now = time.monotonic()
        if turn.last_delta_at is None:
            self.metrics.time_to_first_token.labels(self._model_label).observe(now - turn.asked_at)
        else:
            assert turn.inter_token is not None  # set with `asked_at`
            turn.inter_token.observe(now - turn.last_delta_at)
        turn.last_delta_at = now

    def _count_response(
        self,
        turn: Turn,
        status: str,
        usage: common_pb2.Usage,
        error: SwitchboardError | None,
        cost: int,
    ) -> None:
        model, metrics = self._model_label, self.metrics
        if cost:
            metrics.cost_usd.labels(self.tenant.tier, model).inc(usd(cost))
        metrics.responses.labels(model, status).inc()
        metrics.response_duration.labels(model, status).observe(time.monotonic() - turn.asked_at)
        metrics.tokens.labels(model, "input").inc(usage.input_tokens)
        metrics.tokens.labels(model, "output").inc(usage.output_tokens)
        if error is not None and refusal_reason(error.name) == "quota":
            metrics.rejections.labels(error.name, self.tenant.tier).inc()
