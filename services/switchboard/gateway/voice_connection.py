"""Voice sessions: a client's Realtime WebSocket relayed to a Realtime upstream.

A session whose model routes to a `kind: realtime` upstream (docs/voice.md)
is served here instead of by `RealtimeConnection`: the model runs upstream as
a Realtime session of its own, held by the broker (RealtimeService), and the
gateway relays events both ways over one bidirectional gRPC call per session,
keeping the text path's guarantees at its edge:

- client events are checked before they go (voice_events.py): types, GA
  `session.audio`, locked fields of `ek_` secrets, base64 audio of whole
  samples, the input audio rate and buffer bounds; a refusal is an `error`
  event and the session goes on;
- each upstream response is admitted by the tenant gate when it starts
  (`response.created`; VAD starts responses too) and settled with the
  upstream's usage (audio tokens are tokens) at `response.done`; a response
  the tenant may not have is cancelled upstream and its output dropped;
- server events go through a bounded outbox whose events are never merged
  (an audio delta stays a playable chunk); a client more than
  `SWITCHBOARD_GATEWAY_MAX_BUFFERED_BYTES` behind is closed with 4008
  `slow_consumer`;
- the tenant's server-side tools (toolexec) are offered upstream and run by
  the gateway when the upstream calls them (voice_tools.py);
- the connection slot, the tenant's session length, the drain (1012) and the
  metrics (time to first audio, audio seconds, interruptions, disconnects)
  are kept as for text sessions.

Voice sessions are not recorded in the session's event log: the broker holds
the upstream session past a dropped connection and numbers its events, and a
resume attaches to it there (voice_resume.py, docs/voice.md#resume). A client
that closes its socket with 1000 closes the upstream session too; any other
end (a drop, 4008, 4011, the drain's 1012) leaves it held for a resume.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from switchboard.config import GatewaySettings
from switchboard.errors import InvalidRequest, SwitchboardError
from switchboard.gateway import client_events, items, voice_events, voice_resume
from switchboard.gateway.backends import Backends
from switchboard.gateway.client_secrets import Grant
from switchboard.gateway.ids import Ids
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.sender import SLOW_CONSUMER_CLOSE
from switchboard.gateway.server_tools import ServerTools, ToolCatalogues
from switchboard.gateway.tenant_gate import (
    CONNECTION_LEASE_S,
    RESPONSE_LEASE_S,
    Admitted,
    TenantGate,
)
from switchboard.gateway.voice_mcp import VoiceMcp
from switchboard.gateway.voice_mcp_offer import McpOffer
from switchboard.gateway.voice_mux import MuxedSession, VoiceMux
from switchboard.gateway.voice_outbox import SlowConsumer, VoiceOutbox, error_event
from switchboard.gateway.voice_tools import VoiceTools
from switchboard.limits.ledger import usd
from switchboard.telemetry import tracing
from switchboard.tenancy import Tenant
from switchboard.tenancy.prices_section import Price
from switchboard.v1 import broker_pb2, common_pb2, realtime_pb2, session_pb2

log = logging.getLogger(__name__)

DRAIN_CLOSE = 1012
_TRACER = tracing.tracer("switchboard.gateway.voice")


class VoiceConnection:
    """One client voice session, from the accept to the close (see the module)."""

    def __init__(
        self,
        websocket: WebSocket,
        broker: VoiceMux,
        tenant: Tenant,
        session: session_pb2.Session,
        grant: Grant | None,
        gate: TenantGate,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
        holder: str,
        *,
        backends: Backends,
        catalogues: ToolCatalogues | None = None,
    ) -> None:
        self.websocket = websocket
        self.broker = broker
        self.tenant = tenant
        self.session_id = session.id
        self.model = session.config.model
        self.grant = grant
        self.locked = grant.locked if grant else frozenset()
        self.gate = gate
        self.metrics = metrics
        self.settings = settings
        self.holder = holder
        self.end_reason = "client_closed"
        self.outbox = VoiceOutbox(settings.max_buffered_bytes)
        self.audio = voice_events.AudioInput()
        self._audio_in = metrics.voice_audio_seconds.labels("input")
        self._audio_out = metrics.voice_audio_seconds.labels("output")
        self.session: dict[str, Any] = {"model": self.model}
        self._admitted: dict[str, Admitted] = {}
        self._refused: set[str] = set()
        self._responding = ""
        self._turn_ended: float | None = None
        self._first_audio_sent: set[str] = set()
        self._upstream_model = ""
        self._done = asyncio.Event()
        self._draining = False
        self._close: tuple[int, str] | None = None
        self._log = {"tenant_id": tenant.id, "session_id": session.id}
        self._initial = session.config
        ids = Ids()
        self.mcp = VoiceMcp(
            McpOffer(
                backends,
                tenant.id,
                session.id,
                tenant.mcp_servers,
                new_id=lambda: ids.new("item"),
                to_client=self._send,
            )
        )
        self.tools = VoiceTools(
            ServerTools(backends, tenant.id, session.id, catalogues),
            settings.max_tool_rounds,
            to_upstream=self._to_upstream,
            to_client=self._send,
            on_idle=self._idle,
            mcp=self.mcp,
            hold=self._hold,
            release=self._release,
        )
        # Upstream events held back while a response's MCP calls run, in order.
        self._holding = False
        self._held: collections.deque[bytes] = collections.deque()
        self._holds = 0
        self._background: set[asyncio.Task[None]] = set()
        self.resume = voice_resume.ResumeState()
        # Called with the broker's `opened` (where the session is held).
        self.on_opened: Callable[[realtime_pb2.RealtimeOpened], None] | None = None
        self.client_close_code: int | None = None
        self._call: MuxedSession | None = None
        self._responses: Any = None

    # -- the drain (switchboard.gateway.drain.Drainable) ------------------------------

    def drain(self) -> None:
        """Close with 1012 once no response is running."""
        self._draining = True
        if not self._responding and not self.tools.busy:
            self._end(DRAIN_CLOSE, "draining", "drain")

    def _idle(self) -> None:
        """A server-tool round ended without a follow-up response."""
        if self._draining and not self._responding:
            self._end(DRAIN_CLOSE, "draining", "drain")

    def stop_now(self) -> None:
        self._end(DRAIN_CLOSE, "draining", "drain")

    def _end(self, code: int, reason: str, end_reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self.end_reason = end_reason
        self._done.set()

    # -- the session ------------------------------------------------------------------

    async def run(self, draining: bool) -> None:
        """Serve until the client leaves, the upstream ends, or a limit closes it."""
        attributes = tracing.ids(self.tenant.id, self.session_id)
        with tracing.span(_TRACER, "voice session", attributes=attributes):
            await self.tools.load()
            call = self._call or self.open()
            tasks = [
                asyncio.create_task(self._read_client()),
                asyncio.create_task(self._read_upstream(call)),
                asyncio.create_task(self._write()),
                asyncio.create_task(self._keep_slots()),
            ]
            if draining:
                self.drain()
            try:
                await self._done.wait()
            finally:
                await self._close_upstream(tasks[1])
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.tools.close()
                for task in list(self._background):
                    task.cancel()  # a listing, or held events let go
                call.cancel()
                await self._settle_all()
            if self._close is not None:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await self.websocket.close(*self._close)

    def start(self, first: realtime_pb2.RealtimeRequest) -> MuxedSession:
        """Start the broker call with `first` (`open`, or `attach` for a resume)."""
        self._call = call = self.broker.Session()
        call.write(first)
        self._responses = aiter(call)
        return call

    def open(self) -> MuxedSession:
        """Start the broker call that opens the session."""
        return self.start(realtime_pb2.RealtimeRequest(open=self._opening()))

    async def first_response(self) -> realtime_pb2.RealtimeResponse:
        """The broker's first answer (before `run`; `attached` for a resume)."""
        response: realtime_pb2.RealtimeResponse = await anext(self._responses)
        return response

    def cancel_call(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def attached(self, attached: realtime_pb2.RealtimeAttached, after_seq: int) -> None:
        """Take up a session another connection left: its upstream and its settings."""
        self.resume.attached(attached, after_seq)
        self._upstream_model = attached.upstream_model
        if attached.session_event:
            self._session_event(orjson.loads(attached.session_event))

    def notify(self, text: str) -> None:
        """Send an event of the gateway's before any other."""
        self._send(text)

    async def _close_upstream(self, reader: asyncio.Task[None]) -> None:
        """When the client closed the session, have the broker close the upstream
        (and wait a little for it); otherwise the broker holds it for a resume."""
        if not voice_resume.closes_upstream(self.end_reason, self.client_close_code):
            return
        if self._call is not None:
            self._call.write(voice_resume.CLOSE)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(reader), voice_resume.CLOSE_WAIT_S)

    def _opening(self) -> realtime_pb2.RealtimeOpen:
        config = self._initial
        session: dict[str, Any] = {"type": "realtime"}
        if config.instructions:
            session["instructions"] = config.instructions
        if config.max_output_tokens:
            session["max_output_tokens"] = config.max_output_tokens
        if self.grant is not None:
            # What the ephemeral secret fixed; its other fields are the text
            # path's defaults, which a voice session does not take.
            granted = self.grant.session
            for name in ("instructions", "tools", "tool_choice", "audio"):
                if granted.get(name):
                    session[name] = granted[name]
        return realtime_pb2.RealtimeOpen(
            tenant_id=self.tenant.id,
            session_id=self.session_id,
            model=self.model,
            session_json=orjson.dumps(self.tools.opening(session)).decode(),
        )

    def _to_upstream(self, event: bytes) -> None:
        if self._call is not None:  # started before anything can go upstream
            self._call.write_events([event])

    def _send(self, text: str, first_audio_of: str = "") -> None:
        try:
            self.outbox.put(self.resume.local_ids(text), first_audio_of)
        except SlowConsumer as exc:
            log.warning("slow consumer", extra={**self._log, "detail": str(exc)})
            self._end(SLOW_CONSUMER_CLOSE, "slow_consumer", "slow_consumer")

    async def _write(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                await self.websocket.send_text(item.text)
                if item.first_audio_of and self._turn_ended is not None:
                    elapsed = time.monotonic() - self._turn_ended
                    self.metrics.voice_time_to_first_audio.labels(self.model).observe(elapsed)
                    self._turn_ended = None
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._end(1000, "", "client_closed")

    async def _keep_slots(self) -> None:
        """Renew the connection slot; end the session at the tenant's length limit."""
        started = time.monotonic()
        limit = self.tenant.limits.max_session_seconds
        period = min(CONNECTION_LEASE_S, RESPONSE_LEASE_S) / 3
        while True:
            wait = period if limit is None else min(period, limit - (time.monotonic() - started))
            await asyncio.sleep(max(wait, 0))
            if limit is not None and time.monotonic() - started >= limit:
                error = SwitchboardError(
                    "The session reached its maximum length.",
                    code=common_pb2.ERROR_CODE_SESSION_EXPIRED,
                )
                self._send(error_event(error))
                await asyncio.sleep(0.1)  # let the writer send it
                self._end(error.spec.close_code or 1000, error.name, "session_expired")
                return
            with contextlib.suppress(SwitchboardError):
                await self.gate.keep_connection(self.tenant, self.holder)
                for admitted in list(self._admitted.values()):
                    await self.gate.keep_response(self.tenant, admitted)

    # -- client -> upstream ------------------------------------------------------------

    async def _read_client(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.client_close_code = message.get("code")
                    self._end(1000, "", "client_closed")
                    return
                text = message.get("text")
                if text is None:
                    error = InvalidRequest(
                        "Binary frames are not supported; send JSON text frames.",
                        code=common_pb2.ERROR_CODE_BINARY_FRAME_UNSUPPORTED,
                    )
                    self._send(error_event(error))
                    continue
                await self._client_event(text)
        except WebSocketDisconnect as exc:
            self.client_close_code = exc.code
            self._end(1000, "", "client_closed")
        except (RuntimeError, OSError):
            self._end(1000, "", "client_closed")

    async def _client_event(self, text: str) -> None:
        event: dict[str, Any] = {}
        try:
            event = client_events.decode(text, self.settings.max_event_bytes)
            kind = client_events.event_type(event)
            if kind == "input_audio_buffer.append":
                seconds = self.audio.append(event.get("audio"), time.monotonic())
                self._audio_in.inc(seconds)
            elif kind == "session.update":
                servers = self.tenant.mcp_servers
                fmt = voice_events.check_session(
                    event.get("session"), self.session, self.locked, servers
                )
                if fmt is not None:
                    self.audio.format = fmt
            else:
                voice_events.check_event(event, kind, self.tenant.mcp_servers)
            item = event.get("item") if kind == "conversation.item.create" else None
            if isinstance(item, dict) and item.get("type") == "mcp_approval_response":
                # The gateway's to act on: the upstream knows no MCP.
                self.mcp.approval_answer(items.item_from_client(item))
                return
            # MCP servers offered for the first time are listed before the event goes.
            await self.tools.prepare(event, kind)
        except InvalidRequest as error:
            self._send(error_event(error, event.get("event_id")))
            return
        if kind in ("input_audio_buffer.commit", "response.create"):
            self._turn_ended = time.monotonic()
        if kind in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
            self.audio.emptied()
        forwarded = self.tools.client(event, kind, text)
        if forwarded is not None:
            self._to_upstream(forwarded.encode())

    # -- upstream -> client ------------------------------------------------------------

    async def _read_upstream(self, call: Any) -> None:
        try:
            async for response in self._responses:
                kind = response.WhichOneof("kind")
                if kind == "failure":
                    await self._upstream_failed(response.failure)
                    return
                if kind == "opened":
                    log.info(
                        "voice session opened",
                        extra={**self._log, "upstream": response.opened.upstream},
                    )
                    self._upstream_model = response.opened.upstream_model
                    if self.on_opened is not None:
                        self.on_opened(response.opened)
                    continue
                for raw in response.events.events:
                    if self._holding:
                        self._held.append(raw)
                        self.tools.held(orjson.loads(raw))
                        continue
                    await self._upstream_event(raw)
        except grpc.RpcError:
            await self._upstream_failed(
                _failure("The broker does not answer.", common_pb2.ERROR_CODE_SERVICE_UNAVAILABLE)
            )
            return
        if self._close is None:
            await self._upstream_failed(
                _failure(
                    "The voice session ended upstream.",
                    common_pb2.ERROR_CODE_UPSTREAM_STREAM_BROKEN,
                )
            )

    def _hold(self) -> None:
        """Hold the upstream's next events back (a response's MCP calls run)."""
        self._holding = True
        self._holds += 1

    def _release(self) -> None:
        """Let the held events go, in order, then the live stream."""
        task = asyncio.create_task(self._flush_held(self._holds))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_held(self, hold: int) -> None:
        while self._held:
            await self._upstream_event(self._held.popleft())
            if self._holds != hold:
                return  # a held response's MCP calls run now: its round releases the rest
        self._holding = False

    async def _upstream_failed(self, failure: Any) -> None:
        error = SwitchboardError(failure.message, code=failure.code, param=failure.param or None)
        log.warning("voice session failed", extra={**self._log, "code": error.name})
        self._send(error_event(error))
        await asyncio.sleep(0)
        # Let the writer send the error first (bounded: the close comes regardless).
        for _ in range(50):
            if not self.outbox.size:
                break
            await asyncio.sleep(0.01)
        self._end(error.spec.close_code or 1011, error.name, "upstream_error")

    async def _upstream_event(self, raw: bytes) -> None:
        # Audio deltas are decoded whole too: orjson does it faster than Python
        # code finds their ids in the bytes (docs/voice.md#performance).
        event = orjson.loads(raw)
        kind = event.get("type")
        # Given to an earlier connection of the session (a resume's replay),
        # which admitted or settled it.
        seen = self.resume.seen(event)
        response_id = event.get("response_id", "")
        if response_id and response_id in self._refused:
            return  # output of a response the tenant may not have
        # An MCP call's events are the client's `mcp_call` item's.
        translated = self.mcp.translate(event)
        if translated == "":
            return  # held until the call ran, or the gateway's own answer
        if translated is not None:
            raw = translated.encode()
        first_audio = ""
        if kind == "response.output_audio.delta":
            audio = event.get("delta")
            if isinstance(audio, str):
                self._audio_out.inc(voice_events.audio_seconds(self._output_format(), len(audio)))
            first_audio = self._first_audio(response_id)
        elif kind in ("session.created", "session.updated"):
            raw = self.tools.session(event) or raw  # the client sees its own tools
            self._session_event(event)
            if kind == "session.created" and not seen and self.mcp.offer.session_tools:
                # An `ek_` secret's MCP servers, listed now that the session is open.
                task = asyncio.create_task(self.tools.list_session())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        elif kind in ("input_audio_buffer.committed", "input_audio_buffer.cleared"):
            self.audio.emptied()
        elif kind == "input_audio_buffer.speech_started" and self._responding:
            self.metrics.voice_interruptions.inc()
        elif kind == "input_audio_buffer.speech_stopped":
            self._turn_ended = time.monotonic()
        refusal = None
        if kind == "response.created":
            refusal = await self._admit(event, adopt=seen)
        elif kind == "response.done":
            await self._settle(event, settled=seen)
            # An earlier connection ran the tool rounds of what it was given.
            self.tools.response_done(event, raw.decode(), run=not seen)
            return
        self._send(raw.decode(), first_audio)
        if refusal is not None:
            self._send(refusal)
        if not seen:  # an earlier connection ran the tool rounds of what it was given
            self.tools.upstream(event)

    def _first_audio(self, response_id: str) -> str:
        """`response_id` if this is its first audio (for time to first audio), else ""."""
        if response_id in self._first_audio_sent:
            return ""
        self._first_audio_sent.add(response_id)
        return response_id

    def _output_format(self) -> str:
        audio = self.session.get("audio")
        fmt = (((audio or {}).get("output") or {}).get("format") or {}).get("type")
        return fmt if fmt in voice_events.FORMATS else "audio/pcm"

    def _session_event(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if isinstance(session, dict):
            self.session = session
            audio = session.get("audio") or {}
            fmt = ((audio.get("input") or {}).get("format") or {}).get("type")
            if fmt in voice_events.FORMATS:
                self.audio.format = fmt

    async def _admit(self, event: dict[str, Any], adopt: bool = False) -> str | None:
        """Admit a response the upstream started; the `error` event when it is refused
        (it is cancelled upstream, and its output dropped). `adopt`: an earlier
        connection admitted it; settling it settles that admission."""
        response = event.get("response") or {}
        response_id = str(response.get("id") or "")
        self._responding = response_id
        if adopt:
            self._admitted[response_id] = self.gate.adopt(self.tenant, response_id)
            return None
        try:
            admitted = await self.gate.admit_response(
                self.tenant,
                response_id,
                prompt_tokens=0,
                max_output_tokens=self.gate.output_cap(self.tenant, 0),
                price=self._price(highest=True),
            )
        except SwitchboardError as error:
            self._refused.add(response_id)
            cancel = orjson.dumps({"type": "response.cancel", "response_id": response_id})
            self._to_upstream(cancel)
            self.metrics.rejections.labels(error.name, self.tenant.tier).inc()
            return error_event(error)
        self._admitted[response_id] = admitted
        return None

    async def _settle(self, event: dict[str, Any], settled: bool = False) -> None:
        """Settle a finished response with its usage (a refused one has nothing to
        settle; one an earlier connection was given the end of, it settled)."""
        response = event.get("response") or {}
        response_id = str(response.get("id") or "")
        if response_id == self._responding:
            self._responding = ""
            if self._draining and not self.tools.wants(event):
                self._end(DRAIN_CLOSE, "draining", "drain")
        if response_id in self._refused:
            # Its output was dropped; its end is the client's to see (cancelled).
            self._refused.discard(response_id)
            return
        admitted = self._admitted.pop(response_id, None)
        if settled:
            return
        if admitted is None and self.resume.resumed:
            # Started before the resume by a connection that is gone.
            admitted = self.gate.adopt(self.tenant, response_id)
        counted, audio = voice_events.response_usage(response.get("usage"))
        self.metrics.tokens.labels(self.model, "input").inc(counted.input_tokens)
        self.metrics.tokens.labels(self.model, "output").inc(counted.output_tokens)
        if admitted is not None:
            try:
                await self.gate.finish_response(self.tenant, admitted, counted.total_tokens)
                # Audio tokens at the audio prices (text prices where none are listed).
                cost = await self.gate.record_cost(
                    self.tenant,
                    self.session_id,
                    response_id,
                    self.model,
                    counted,
                    self._price(),
                    audio,
                )
                if cost:
                    self.metrics.cost_usd.labels(self.tenant.tier, self.model).inc(usd(cost))
            except SwitchboardError as exc:
                log.warning("usage not settled", extra={**self._log, "code": exc.name})

    def _price(self, *, highest: bool = False) -> Price | None:
        """The upstream model's price; `highest`: per direction the higher of its
        text and audio prices (what a response reserves of a money budget)."""
        price = self.gate.price_of(self.tenant, self.model, self._upstream_model)
        return price.highest() if price is not None and highest else price

    async def _settle_all(self) -> None:
        """Free what responses still hold when the session ends mid-response."""
        for admitted in self._admitted.values():
            with contextlib.suppress(SwitchboardError):
                await self.gate.finish_response(self.tenant, admitted, 0)
        self._admitted.clear()


def _failure(message: str, code: int) -> broker_pb2.CallFailure:
    return broker_pb2.CallFailure(code=common_pb2.ErrorCode.ValueType(code), message=message)
