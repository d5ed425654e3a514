"""The grpc.aio servicer of `switchboard.v1.RealtimeService`: voice sessions.

`Session` is one client voice session, relayed between the gateway's gRPC
stream and one upstream Realtime WebSocket (realtime_upstream.py). The first
request opens it: the tenant's model is routed (`routing.resolve` with
`kind="realtime"`; the preferred deployment, no failover once a session is
open), a slot of the upstream's admission control is held for the whole
session, the socket is opened with the upstream's key, and the session the
gateway asked for is applied with one `session.update` before anything else.
The client sees the upstream's `session.created` carrying that session, with
the session id and model name of Switchboard, never the upstream's.

Then events flow both ways in order, untouched, except `session.created` and
`session.updated`, whose `session.id` and `session.model` are rewritten, and
every event's `event_id`, which numbers it (realtime_held.py). The session
outlives the call: it ends when the gateway sends `close` (its client closed
the socket), when the upstream closes the socket (which a following gateway
learns as a `failure`), or when it was held without a caller for
`voice_hold_s`. A call may `attach` to a held session (a resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from opentelemetry import trace

from switchboard.broker import realtime_mux
from switchboard.broker.admission import Admission
from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.multiplex import failure_of
from switchboard.broker.realtime_held import (
    HeldSession,
    HeldSessions,
    Outgoing,
    SessionEnds,
    UpstreamSocket,
    as_response,
    resume_refused,
)
from switchboard.broker.realtime_link import RealtimeLink
from switchboard.broker.realtime_upstream import RealtimeSocket, UpstreamClosed, connect
from switchboard.broker.routing import resolve
from switchboard.config import BrokerSettings
from switchboard.errors import (
    InternalError,
    InvalidRequest,
    SwitchboardError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from switchboard.telemetry import tracing
from switchboard.tenancy import LiveTenants
from switchboard.v1 import realtime_pb2, realtime_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "switchboard.v1.RealtimeService"
# Events whose `session` object names the upstream's id and model
# (`session.created`, `session.updated`), found by their type's prefix.
_SESSION_EVENT = b'"session.'


def rewrite_session(event: bytes, session_id: str, model: str) -> bytes:
    """`event` with `session.id` and `session.model` made Switchboard's, if it carries a session."""
    if event.find(_SESSION_EVENT, 0, 200) < 0:  # every audio event: one scan, no copy
        return event
    try:
        parsed = orjson.loads(event)
    except orjson.JSONDecodeError:
        return event
    session = parsed.get("session") if isinstance(parsed, dict) else None
    if parsed.get("type") not in ("session.created", "session.updated") or not isinstance(
        session, dict
    ):
        return event
    session["id"], session["model"] = session_id, model
    return orjson.dumps(parsed)


class RealtimeSessions(realtime_pb2_grpc.RealtimeServiceServicer):
    """Serves RealtimeService: each voice session over one upstream WebSocket,
    held past its call for a resume (realtime_held.py)."""

    def __init__(
        self,
        tenants: LiveTenants,
        admission: Admission,
        settings: BrokerSettings,
        metrics: BrokerMetrics,
    ) -> None:
        self._tenants = tenants
        self._admission = admission
        self._settings = settings
        self._metrics = metrics
        self.held = HeldSessions()
        metrics.realtime_held_sessions_active.set_function(self.held.held_count)
        self._muxes: set[realtime_mux.SessionMux] = set()
        self._draining = False

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to a grpc.aio server."""
        realtime_pb2_grpc.add_RealtimeServiceServicer_to_server(self, server)

    def drain(self) -> None:
        """The server drains: every `Sessions` call refuses new sessions, ends after its own."""
        self._draining = True
        for mux in self._muxes:
            mux.drain()

    async def Sessions(
        self,
        requests: AsyncIterator[realtime_pb2.RealtimeMuxRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[realtime_pb2.RealtimeMuxResponse]:
        """A gateway's voice sessions over one call, each as `Session` runs it (realtime_mux.py)."""
        # A session on the call is cancelled by the mux when the call ends.
        handler = self._session
        responses = realtime_mux.serve(handler, requests, context, self._muxes, self._draining)
        async with contextlib.aclosing(responses) as each:
            async for response in each:
                yield response

    async def Session(
        self,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[realtime_pb2.RealtimeResponse]:
        """One voice session (`opened`, or `attached` to a held one), then the
        upstream's events, maybe a last `failure`."""

        def on_caller_gone(detach: Callable[[], None]) -> None:
            # The generator may be closed only later: hold the session at once.
            context.add_done_callback(lambda _context: detach())

        responses = self._session(requests, context, on_caller_gone)
        async with contextlib.aclosing(responses) as stream:  # type: ignore[type-var]
            async for response in stream:
                yield as_response(response)

    async def _session(
        self,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        context: grpc.aio.ServicerContext,
        on_caller_gone: Callable[[Callable[[], None]], None] | None = None,
    ) -> AsyncIterator[Outgoing]:
        try:
            first = await anext(aiter(requests))
        except (StopAsyncIteration, grpc.RpcError):
            return
        action = first.WhichOneof("action")
        if action == "attach":
            responses = self._attach(first.attach, requests, on_caller_gone)
        elif action == "open":
            responses = self._open(first.open, requests, on_caller_gone)
        else:
            yield _failed(InvalidRequest("The first message of a voice session must open it."))
            return
        async with contextlib.aclosing(responses) as stream:
            async for response in stream:
                yield response

    async def _attach(
        self,
        attach: realtime_pb2.RealtimeAttach,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        on_caller_gone: Callable[[Callable[[], None]], None] | None,
    ) -> AsyncGenerator[Outgoing, None]:
        held = self.held.get(attach.tenant_id, attach.session_id)
        if held is None:
            yield _failed(
                resume_refused(
                    "The voice session is no longer held (its hold ran out, the client "
                    "closed it, or its broker restarted); start a new session."
                )
            )
            return

        def attached(audio_lost: bool) -> realtime_pb2.RealtimeResponse:
            return realtime_pb2.RealtimeResponse(
                attached=realtime_pb2.RealtimeAttached(
                    upstream=held.ends.upstream,
                    upstream_model=held.ends.upstream_model,
                    delivered_seq=held.delivered_seq,
                    last_seq=held.seq,
                    session_event=held.session_json,
                    audio_lost=audio_lost,
                )
            )

        try:
            async with contextlib.aclosing(
                held.follow(requests, attach.after_seq, attached, on_caller_gone)
            ) as stream:
                log.info(
                    "voice session attached",
                    extra={**held.ends.ids, "after_seq": attach.after_seq, "seq": held.seq},
                )
                async for response in stream:
                    yield response
        except SwitchboardError as err:
            yield _failed(err)

    async def _open(
        self,
        opening: realtime_pb2.RealtimeOpen,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        on_caller_gone: Callable[[Callable[[], None]], None] | None,
    ) -> AsyncGenerator[Outgoing, None]:
        ends = SessionEnds({"tenant_id": opening.tenant_id, "session_id": opening.session_id})
        held: HeldSession | None = None
        async with contextlib.AsyncExitStack() as stack:
            try:
                target = resolve(
                    self._tenants.current,
                    opening.tenant_id,
                    opening.model,
                    model_override=self._settings.upstream_model,
                    kind="realtime",
                )
                chosen = min(target.candidates, key=lambda candidate: candidate.priority)
                ends.upstream, ends.upstream_model = chosen.upstream.name, chosen.model
                await stack.enter_async_context(
                    self._admission.slot(chosen.upstream, opening.tenant_id)
                )
                headers = tracing.headers(trace.get_current_span())

                def reopen() -> Awaitable[RealtimeSocket]:
                    return connect(
                        chosen.upstream,
                        chosen.model,
                        timeout_s=self._settings.connect_timeout_s,
                        headers=headers,
                    )

                upstream, rollovers = ends.upstream, self._metrics.realtime_rollovers
                socket = RealtimeLink(
                    await reopen(),
                    reopen=reopen,
                    rollover=chosen.upstream.rollover,
                    timeout_s=self._settings.connect_timeout_s,
                    counted=lambda outcome: rollovers.labels(upstream, outcome).inc(),
                    log_extra=ends.ids,
                )
                stack.push_async_callback(socket.close)
                created = await self._configure(socket, opening)
            except SwitchboardError as err:
                self._ended(ends, opening.model, err.name)
                self._metrics.upstream_errors.labels(ends.upstream or "none", err.name).inc()
                yield _failed(err)
                return
            except asyncio.CancelledError:
                self._ended(ends, opening.model, "cancelled")
                raise
            except Exception:
                log.exception("realtime session failed", extra=ends.ids)
                self._ended(ends, opening.model, "failed")
                yield _failed(InternalError("The broker failed."))
                return
            # From here the held session owns the socket and the admission slot.
            owned = stack.pop_all()

        async def on_end(ended: HeldSession, outcome: str) -> None:
            self.held.remove(ended)
            self._metrics.realtime_sessions_active.labels(ends.upstream).dec()
            await owned.aclose()
            self._ended(ends, opening.model, outcome)

        held = HeldSession(
            (opening.tenant_id, opening.session_id),
            socket,
            hold_s=self._settings.voice_hold_s,
            replay_max_bytes=self._settings.voice_replay_max_bytes,
            ends=ends,
            rewrite=lambda frame: rewrite_session(frame, opening.session_id, opening.model),
            on_end=on_end,
        )
        self._metrics.realtime_sessions_active.labels(ends.upstream).inc()
        self.held.add(held)
        held.start(created)
        opened = realtime_pb2.RealtimeResponse(
            opened=realtime_pb2.RealtimeOpened(
                upstream=ends.upstream,
                upstream_model=ends.upstream_model,
                broker=self._settings.advertise_address,
            )
        )
        following = held.follow(requests, 0, lambda _lost: opened, on_caller_gone)
        async with contextlib.aclosing(following) as stream:
            async for response in stream:
                yield response

    def _ended(self, ends: SessionEnds, model: str, outcome: str) -> None:
        self._metrics.realtime_sessions.labels(ends.upstream or "none", outcome).inc()
        log.info(
            "realtime session ended",
            extra={
                **ends.ids,
                "model": model,
                "upstream": ends.upstream,
                "upstream_model": ends.upstream_model,
                "outcome": outcome,
                "duration_ms": round((time.monotonic() - ends.started) * 1000),
                "events_in": ends.events_in,
                "events_out": ends.events_out,
            },
        )

    async def _configure(self, socket: UpstreamSocket, opening: realtime_pb2.RealtimeOpen) -> bytes:
        """Wait for the upstream's `session.created`, apply the gateway's session; the
        `session.created` the client gets (the session as configured)."""
        timeout = self._settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                created = orjson.loads(await socket.recv(decode=False))
                if created.get("type") != "session.created":
                    raise UpstreamStreamBroken("The upstream did not open with session.created.")
                if opening.session_json:
                    update = (
                        b'{"type":"session.update","session":'
                        + opening.session_json.encode()
                        + b"}"
                    )
                    await socket.send(update, text=True)
                    while True:
                        answer = orjson.loads(await socket.recv(decode=False))
                        if answer.get("type") == "session.updated":
                            created["session"] = answer["session"]
                            break
                        if answer.get("type") == "error":
                            raise _upstream_refused(answer)
        except TimeoutError:
            raise UpstreamTimeout("The upstream did not configure the session in time.") from None
        except UpstreamClosed:
            raise UpstreamStreamBroken("The upstream closed the session as it opened.") from None
        except (orjson.JSONDecodeError, AttributeError, KeyError):
            raise UpstreamStreamBroken("The upstream sent an event that is not JSON.") from None
        return rewrite_session(orjson.dumps(created), opening.session_id, opening.model)


def _upstream_refused(answer: dict[str, Any]) -> SwitchboardError:
    raw = answer.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    message = str(error.get("message") or "The upstream refused the session's configuration.")
    return InvalidRequest(message, param=str(error["param"]) if error.get("param") else None)


def _failed(error: SwitchboardError) -> realtime_pb2.RealtimeResponse:
    return realtime_pb2.RealtimeResponse(failure=failure_of(error))
