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
`session.updated`, whose `session.id` and `session.model` are rewritten. The
session ends when the gateway ends its requests (the socket is closed) or when
the upstream closes the socket, which the gateway learns as a `failure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import websockets
from opentelemetry import trace
from websockets.asyncio.client import ClientConnection

from switchboard.broker import realtime_mux
from switchboard.broker.admission import Admission
from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.multiplex import failure_of
from switchboard.broker.realtime_link import RealtimeLink
from switchboard.broker.realtime_upstream import connect
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
# Events whose `session` object names the upstream's id and model.
_SESSION_EVENTS = (b"session.created", b"session.updated")


@dataclass
class _Ends:
    """What the one log line of a session says."""

    ids: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    upstream: str = ""
    upstream_model: str = ""
    events_in: int = 0
    events_out: int = 0


def rewrite_session(event: bytes, session_id: str, model: str) -> bytes:
    """`event` with `session.id` and `session.model` made Switchboard's, if it carries a session."""
    if not any(kind in event[:200] for kind in _SESSION_EVENTS):
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
    """Serves RealtimeService: each voice session over one upstream WebSocket."""

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
        responses = realtime_mux.serve(self.Session, requests, context, self._muxes, self._draining)
        async with contextlib.aclosing(responses) as each:
            async for response in each:
                yield response

    async def Session(
        self,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[realtime_pb2.RealtimeResponse]:
        """One voice session: `opened`, then the upstream's events, maybe a last `failure`."""
        try:
            first = await anext(aiter(requests))
        except (StopAsyncIteration, grpc.RpcError):
            return
        if first.WhichOneof("action") != "open":
            yield _failed(InvalidRequest("The first message of a voice session must open it."))
            return
        opening = first.open
        ends = _Ends({"tenant_id": opening.tenant_id, "session_id": opening.session_id})
        outcome = "failed"
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
            async with self._admission.slot(chosen.upstream, opening.tenant_id):
                headers = tracing.headers(trace.get_current_span())

                def reopen() -> Awaitable[ClientConnection]:
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
                self._metrics.realtime_sessions_active.labels(ends.upstream).inc()
                try:
                    created = await self._configure(socket, opening)
                    yield realtime_pb2.RealtimeResponse(
                        opened=realtime_pb2.RealtimeOpened(
                            upstream=ends.upstream, upstream_model=ends.upstream_model
                        )
                    )
                    yield _events([created])
                    async with contextlib.aclosing(
                        _relay(requests, socket, opening, ends)
                    ) as relay:
                        async for response in relay:
                            yield response
                    outcome = "closed"
                finally:
                    self._metrics.realtime_sessions_active.labels(ends.upstream).dec()
                    await socket.close()
        except SwitchboardError as err:
            outcome = err.name
            self._metrics.upstream_errors.labels(ends.upstream or "none", err.name).inc()
            yield _failed(err)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            log.exception("realtime session failed", extra=ends.ids)
            yield _failed(InternalError("The broker failed."))
        finally:
            self._metrics.realtime_sessions.labels(ends.upstream or "none", outcome).inc()
            log.info(
                "realtime session ended",
                extra={
                    **ends.ids,
                    "model": opening.model,
                    "upstream": ends.upstream,
                    "upstream_model": ends.upstream_model,
                    "outcome": outcome,
                    "duration_ms": round((time.monotonic() - ends.started) * 1000),
                    "events_in": ends.events_in,
                    "events_out": ends.events_out,
                },
            )

    async def _configure(self, socket: RealtimeLink, opening: realtime_pb2.RealtimeOpen) -> bytes:
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
        except websockets.exceptions.ConnectionClosed:
            raise UpstreamStreamBroken("The upstream closed the session as it opened.") from None
        except (orjson.JSONDecodeError, AttributeError, KeyError):
            raise UpstreamStreamBroken("The upstream sent an event that is not JSON.") from None
        return rewrite_session(orjson.dumps(created), opening.session_id, opening.model)


def _upstream_refused(answer: dict[str, Any]) -> SwitchboardError:
    raw = answer.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    message = str(error.get("message") or "The upstream refused the session's configuration.")
    return InvalidRequest(message, param=str(error["param"]) if error.get("param") else None)


async def _relay(
    requests: AsyncIterator[realtime_pb2.RealtimeRequest],
    socket: RealtimeLink,
    opening: realtime_pb2.RealtimeOpen,
    ends: _Ends,
) -> AsyncGenerator[realtime_pb2.RealtimeResponse, None]:
    """The upstream's events, while the gateway's go upstream in a task of their own."""
    done = asyncio.Event()

    async def forward() -> None:
        try:
            async for request in requests:
                for event in request.events.events:
                    ends.events_in += 1
                    await socket.send(event, text=True)
        except (grpc.RpcError, websockets.exceptions.ConnectionClosed):
            pass
        finally:
            done.set()
            # The caller is gone or done: the upstream session ends with it.
            await socket.close()

    sender = asyncio.create_task(forward())
    try:
        while True:
            try:
                frame = await socket.recv(decode=False)
            except websockets.exceptions.ConnectionClosed:
                break
            ends.events_out += 1
            yield _events([rewrite_session(frame, opening.session_id, opening.model)])
        if not done.is_set():
            yield _failed(UpstreamStreamBroken("The upstream closed the session."))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


def _events(events: list[bytes]) -> realtime_pb2.RealtimeResponse:
    return realtime_pb2.RealtimeResponse(events=realtime_pb2.RealtimeEvents(events=events))


def _failed(error: SwitchboardError) -> realtime_pb2.RealtimeResponse:
    return realtime_pb2.RealtimeResponse(failure=failure_of(error))
