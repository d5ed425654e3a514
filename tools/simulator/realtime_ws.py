"""The simulator's Realtime WebSocket endpoint, `GET /v1/realtime?model=...`.

A thin aiohttp driver around `voice.VoiceSession`: it checks the key, answers
each client event with what the session returns, and sends a response's
planned events on their schedule in a task of its own, which a cancel (the
client's or the voice activity detection's) stops at once. Faults: the
server-wide `status` refuses the upgrade with that HTTP status; a session's
`disconnect_after` closes the socket abruptly after that many audio deltas of
a response; `session_limit_s` ends the session with a `session_expired` error
after that long, as OpenAI's 60-minute limit does. Each session is recorded
in the observation log `GET /_sim/realtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import WSMsgType, web

from tools.simulator import script
from tools.simulator.voice import Plan, VoiceSession

if TYPE_CHECKING:
    from tools.simulator.server import SimulatorState

MAX_SESSIONS: Final = 1_000
MAX_FRAME: Final = 16 * 1024 * 1024


@dataclass
class ResponseRecord:
    id: str
    started_at: float
    ended_at: float | None = None
    outcome: str = "in_progress"
    audio_deltas: int = 0
    # The names of the function tools the session offered when the response started.
    tools: list[str] = field(default_factory=list)


@dataclass
class SessionRecord:
    """One Realtime session as the simulator saw it (`GET /_sim/realtime`)."""

    id: str
    model: str
    started_at: float
    ended_at: float | None = None
    outcome: str = "in_progress"
    client_events: dict[str, int] = field(default_factory=dict)
    responses: list[ResponseRecord] = field(default_factory=list)
    audio_in_bytes: int = 0
    traceparent: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RealtimeLog:
    """The last `MAX_SESSIONS` Realtime sessions, oldest first."""

    def __init__(self) -> None:
        self.sessions: deque[SessionRecord] = deque(maxlen=MAX_SESSIONS)
        self.open: set[web.WebSocketResponse] = set()


def _send(ws: web.WebSocketResponse, event: dict[str, Any]) -> Any:
    return ws.send_str(orjson.dumps(event).decode())


async def _play(
    ws: web.WebSocketResponse, session: VoiceSession, plan: Plan, record: ResponseRecord
) -> None:
    """Send a plan's events at their times; cut the socket where the plan says."""
    start = time.monotonic()
    for step in plan.steps:
        delay = start + step.at_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if step.audio_ms and plan.stamp_audio:
            # The send time (CLOCK_MONOTONIC, the same in every process of the
            # machine): what the upstream's own gaps were (tools/bench_voice.py).
            await _send(ws, {**step.event, "sim_sent_at": time.monotonic()})
        else:
            await _send(ws, step.event)
        if step.audio_ms:
            record.audio_deltas += 1
            if plan.disconnect_after is not None and record.audio_deltas >= plan.disconnect_after:
                record.outcome, record.ended_at = "sim_disconnected", time.time()
                transport = ws._req.transport if ws._req is not None else None
                if transport is not None:
                    transport.abort()
                return
    record.outcome, record.ended_at = "completed", time.time()
    session.finished(plan.response_id)


def _refuse(status: int, message: str, code: str | None = None) -> web.Response:
    body = script.error_body(status, message, code=code)
    return web.Response(body=body, status=status, content_type="application/json")


def add_routes(app: web.Application, state: SimulatorState) -> None:
    """Serve `/v1/realtime` and the `/_sim/realtime` log on `app`, with the server's `state`."""

    async def realtime(request: web.Request) -> web.StreamResponse:
        return await _serve(request, state)

    async def get_log(request: web.Request) -> web.Response:
        body = orjson.dumps({"sessions": [s.to_json() for s in state.realtime.sessions]})
        return web.Response(body=body, content_type="application/json")

    async def clear_log(request: web.Request) -> web.Response:
        state.realtime.sessions.clear()
        return web.Response(body=b"{}", content_type="application/json")

    async def close_all(app: web.Application) -> None:
        # Cut live sessions at once, as a crashed upstream would.
        for ws in list(state.realtime.open):
            await ws.close(code=1001)

    app.on_shutdown.append(close_all)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_get("/_sim/realtime", get_log)
    app.router.add_delete("/_sim/realtime", clear_log)


async def _serve(request: web.Request, state: SimulatorState) -> web.StreamResponse:
    """Serve one Realtime session over a WebSocket."""
    if not state.authorized(request.headers.get("Authorization")):
        return _refuse(
            401, "Incorrect API key provided (Switchboard simulator).", "invalid_api_key"
        )
    status = state.overrides.get("status")
    if isinstance(status, int):
        return _refuse(status, f"Injected status {status} (Switchboard simulator).")
    model = request.query.get("model", "")
    if not model:
        return _refuse(400, "Missing required parameter: 'model'.")
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=None)
    await ws.prepare(request)
    defaults = state.defaults
    session = VoiceSession(
        "sess_" + uuid.uuid4().hex[:20],
        model,
        ttfa_ms=defaults.ttft_ms,
        chunk_delay_ms=defaults.token_delay_ms,
    )
    record = SessionRecord(
        session.session["id"],
        model,
        time.time(),
        traceparent=request.headers.get("traceparent", ""),
    )
    state.realtime.sessions.append(record)
    state.realtime.open.add(ws)
    player: asyncio.Task[None] | None = None
    limit: asyncio.TimerHandle | None = None
    expired = False
    ending: set[asyncio.Task[None]] = set()

    def expire(seconds: float) -> None:
        nonlocal expired
        expired = True
        # OpenAI's words and close code (1001, going away) at its 60-minute limit.
        minutes = f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"
        message = f"Your session hit the maximum duration of {minutes}."
        task = asyncio.ensure_future(_expire(ws, session.error("session_expired", message)))
        ending.add(task)
        task.add_done_callback(ending.discard)

    try:
        await _send(ws, session.created())
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            try:
                event = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                await _send(ws, session.error("invalid_json", "The frame is not JSON."))
                continue
            if not isinstance(event, dict):
                await _send(ws, session.error("invalid_json", "The frame is not a JSON object."))
                continue
            kind = str(event.get("type"))
            record.client_events[kind] = record.client_events.get(kind, 0) + 1
            if kind == "input_audio_buffer.append" and isinstance(event.get("audio"), str):
                record.audio_in_bytes += len(event["audio"]) * 3 // 4
            reply = session.receive(event)
            if reply.cancelled and player is not None:
                player.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await player
                last = record.responses[-1]
                last.outcome, last.ended_at = "cancelled", time.time()
            for out in reply.events:
                await _send(ws, out)
            if reply.plan is not None:
                tools = session.session.get("tools") or []
                offered = [str(t.get("name")) for t in tools if isinstance(t, dict)]
                response = ResponseRecord(reply.plan.response_id, time.time(), tools=offered)
                record.responses.append(response)
                player = asyncio.create_task(_play(ws, session, reply.plan, response))
            if limit is None and kind == "session.update":
                seconds = session.directive.get("session_limit_s")
                if isinstance(seconds, int | float) and seconds > 0:
                    limit = asyncio.get_running_loop().call_later(seconds, expire, seconds)
    finally:
        state.realtime.open.discard(ws)
        if player is not None and not player.done():
            player.cancel()
            response = record.responses[-1]
            response.outcome, response.ended_at = "client_closed", time.time()
        if limit is not None:
            limit.cancel()
        record.ended_at = time.time()
        record.outcome = "session_expired" if expired else "closed"
    return ws


async def _expire(ws: web.WebSocketResponse, error: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await _send(ws, error)
        await ws.close(code=1001, message=error["error"]["message"].encode())
