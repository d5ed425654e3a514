"""The simulator's HTTP server: an aiohttp app around the pure core in ``script.py``.

It adds what the core cannot have: the clock (time to first token, inter-token delay),
the socket (mid-stream disconnects, noticing a client that went away), and per-server
state — the ``fail_times`` counters, the ``/_sim/config`` overrides and the
observation log of every chat completion request (``/_sim/streams``).

The app must be served with ``handler_cancellation=True`` (``run_simulator`` and the
CLI do): then aiohttp cancels the handler as soon as the client's connection drops,
and the log records ``client_closed`` within milliseconds instead of at the next
token write, which may be seconds away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from aiohttp import web

from tools.simulator import moderation, realtime_ws, script

DEFAULT_MODELS: Final = ("sim-small", "gpt-4o-mini", "gpt-realtime")
MAX_RECORDS: Final = 10_000
MAX_FAIL_KEYS: Final = 100_000

Outcome = Literal["in_progress", "completed", "client_closed", "sim_disconnected", "failed_status"]
JSON: Final = "application/json"
SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class SimulatorConfig:
    """Start-up settings of one simulator server.

    Attributes:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it back from ``base_url``).
        ttft_ms: Default time to first token, in milliseconds.
        token_delay_ms: Default delay between tokens, in milliseconds.
        reply_tokens: Default reply length in tokens (filler words pad short replies).
        api_key: When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
            Excluded from ``repr`` so it never reaches a log.
        models: Model ids listed by ``GET /v1/models`` (any model is accepted).
        moderation_delay_ms: How long ``POST /v1/moderations`` takes to answer.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    ttft_ms: int = 50
    token_delay_ms: int = 10
    reply_tokens: int = 24
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = DEFAULT_MODELS
    moderation_delay_ms: int = 0


@dataclass(slots=True)
class StreamRecord:
    """Observation of one chat completion request, as served by ``GET /_sim/streams``."""

    id: str
    model: str
    stream: bool
    request_key: str
    started_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    outcome: Outcome = "in_progress"
    tokens_sent: int = 0
    messages: int = 0
    last_user: str = ""
    # The W3C trace context the request carried ("" without one).
    traceparent: str = ""

    def finish(self, outcome: Outcome) -> None:
        """Record the end once; the first outcome wins (an abort is not also a close)."""
        if self.outcome == "in_progress":
            self.outcome = outcome
            self.ended_at = time.time()

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (a copy: later updates do not show through)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class SimulatorState:
    """Mutable per-server state; one instance lives in each app under :data:`STATE`."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.base = script.Behaviour(
            ttft_ms=config.ttft_ms, token_delay_ms=config.token_delay_ms, tokens=config.reply_tokens
        )
        self.defaults = self.base
        self.overrides: dict[str, Any] = {}
        self.records: deque[StreamRecord] = deque(maxlen=MAX_RECORDS)
        self.realtime = realtime_ws.RealtimeLog()
        self.active: dict[str, tuple[web.Request, StreamRecord]] = {}
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}".encode()
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "switchboard-sim"}
                    for m in config.models
                ],
            }
        )

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value grants access to ``/v1/*``."""
        if self._auth is None:
            return True
        return header is not None and hmac.compare_digest(header.encode(), self._auth)

    def configure(self, raw: Mapping[str, Any]) -> None:
        """Replace the server-wide overrides (``{}`` resets to start-up defaults).

        Also forgets the ``fail_times`` counters: a new configuration is a new scenario.

        Raises:
            script.RequestError: If ``raw`` has an unknown key or a bad value.
        """
        parsed = script.parse_overrides(raw)
        self.defaults = dataclasses.replace(self.base, **parsed)
        self.overrides = dict(raw)
        self._failures.clear()

    def config_view(self) -> dict[str, Any]:
        """The effective server-wide defaults, as ``GET /_sim/config`` shows them."""
        base = {"ttft_ms": self.base.ttft_ms, "token_delay_ms": self.base.token_delay_ms}
        return {**base, "tokens": self.base.tokens, **self.overrides}

    def should_fail(self, behaviour: script.Behaviour, key: str) -> bool:
        """Whether this request gets the injected ``status`` (counting it if so)."""
        if behaviour.status is None:
            return False
        if behaviour.fail_times is None:
            return True
        seen = self._failures.pop(key, 0)
        self._failures[key] = seen + 1  # re-insert: the dict is kept in LRU order
        if len(self._failures) > MAX_FAIL_KEYS:
            self._failures.popitem(last=False)
        return seen < behaviour.fail_times


STATE: Final = web.AppKey("switchboard_simulator_state", SimulatorState)


def _json(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    return _json(script.error_body(status, message, code=code), status)


async def _due(deadline: float) -> None:
    # Sleep to an absolute deadline so per-token overhead never accumulates as drift.
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def _abort(request: web.Request, record: StreamRecord, *, flush: bool = False) -> None:
    # Mark first: aborting makes aiohttp cancel this handler, and that path must not
    # relabel the simulator's own disconnect as the client's.
    record.finish("sim_disconnected")
    if request.transport is not None:
        if flush:
            # Close after the bytes already written (FIN, the body left unterminated):
            # an abort (RST) may make the client's kernel drop tokens it had
            # received, so the number of tokens before the break would vary.
            request.transport.close()
        else:
            request.transport.abort()


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.authorized(request.headers.get("Authorization")):
        return _unauthorized()
    return _json(state.models_body)


async def _model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.authorized(request.headers.get("Authorization")):
        return _unauthorized()
    model = request.match_info["model"]
    if model not in state.config.models:
        return _error(404, f"The model '{model}' does not exist (simulator)")
    item = {"id": model, "object": "model", "created": 0, "owned_by": "switchboard-sim"}
    return _json(orjson.dumps(item))


def _unauthorized() -> web.Response:
    # Never echo the presented or the expected key.
    return _error(401, "Incorrect API key provided (Switchboard simulator).", "invalid_api_key")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    t0 = asyncio.get_running_loop().time()
    record = StreamRecord(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        model="",
        stream=False,
        request_key="",
        started_at=time.time(),
        traceparent=request.headers.get("traceparent", ""),
    )
    state.records.append(record)
    state.active[record.id] = (request, record)
    try:
        return await _answer(request, state, record, t0)
    except asyncio.CancelledError:
        # With handler_cancellation this runs the moment the client's connection drops.
        record.finish("client_closed")
        raise
    finally:
        del state.active[record.id]


async def _answer(
    request: web.Request, state: SimulatorState, record: StreamRecord, t0: float
) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        record.model = str(body.get("model", ""))
        record.stream = body.get("stream") is True
    if not state.authorized(request.headers.get("Authorization")):
        record.finish("failed_status")
        return _unauthorized()
    if not isinstance(body, dict):
        record.finish("failed_status")
        return _error(400, "The request body must be a JSON object.")
    try:
        plan = script.plan_completion(
            body, state.defaults, completion_id=record.id, created=int(record.started_at)
        )
    except script.RequestError as exc:
        record.finish("failed_status")
        return _error(400, str(exc))
    record.request_key = plan.request_key
    record.messages = plan.message_count
    record.last_user = plan.last_user

    behaviour = plan.behaviour
    if state.should_fail(behaviour, plan.request_key):
        # Injected errors are immediate, like a real rate limiter's, with no TTFT wait.
        record.finish("failed_status")
        status = behaviour.status or 500
        headers = {}
        if behaviour.retry_after is not None:
            seconds = float(behaviour.retry_after)
            headers["retry-after"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
        if behaviour.retry_after_ms is not None:
            headers["retry-after-ms"] = str(behaviour.retry_after_ms)
        message = f"Simulated HTTP {status} injected by the Switchboard upstream simulator."
        return _json(script.error_body(status, message), status, headers)
    if plan.stream:
        return await _stream(request, plan, record, t0)
    return await _complete(request, plan, record, t0)


async def _stream(
    request: web.Request, plan: script.Plan, record: StreamRecord, t0: float
) -> web.StreamResponse:
    behaviour = plan.behaviour
    events = script.stream_script(plan)
    limit = behaviour.disconnect_after
    response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": record.id})
    try:
        await response.prepare(request)
        await response.write(events.head)
        first_due = t0 + behaviour.ttft_ms / 1000
        delay = behaviour.token_delay_ms / 1000
        for index, event in enumerate(events.tokens):
            if limit is not None and index >= limit:
                break
            await _due(first_due + index * delay)
            await response.write(event)
            if index == 0:
                record.first_token_at = time.time()
            record.tokens_sent = index + 1
        if limit is not None:
            # Reached even when the reply is shorter than disconnect_after, so the
            # directive always yields a stream with no finish chunk and no [DONE].
            _abort(request, record, flush=True)
            return response
        await response.write(events.tail)
        await response.write_eof()
    except ConnectionError:  # the write noticed the close before the cancellation did
        record.finish("client_closed")
        return response
    record.finish("completed")
    return response


async def _complete(
    request: web.Request, plan: script.Plan, record: StreamRecord, t0: float
) -> web.StreamResponse:
    await _due(t0 + plan.behaviour.ttft_ms / 1000)
    if plan.behaviour.disconnect_after is not None:
        _abort(request, record)  # no partial JSON to send: the connection just dies
        return web.Response()
    record.first_token_at = time.time()
    record.tokens_sent = plan.completion_tokens
    record.finish("completed")
    return _json(script.completion_body(plan), headers={"x-request-id": record.id})


async def _get_streams(request: web.Request) -> web.Response:
    records = [r.to_json() for r in request.app[STATE].records]
    return _json(orjson.dumps({"streams": records}))


async def _clear_streams(request: web.Request) -> web.Response:
    request.app[STATE].records.clear()
    return _json(b'{"streams":[]}')


async def _get_config(request: web.Request) -> web.Response:
    return _json(orjson.dumps(request.app[STATE].config_view()))


async def _post_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        raw = orjson.loads(await request.read() or b"{}")
        if not isinstance(raw, dict):
            raise script.RequestError("the simulator config must be a JSON object")
        state.configure(raw)
    except (orjson.JSONDecodeError, script.RequestError) as exc:
        return _error(400, str(exc))
    return _json(orjson.dumps(state.config_view()))


async def _moderations(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.authorized(request.headers.get("Authorization")):
        return _unauthorized()
    return await moderation.moderations(request, delay_ms=state.config.moderation_delay_ms)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _on_shutdown(app: web.Application) -> None:
    # Cut in-flight streams at once, as a crashed upstream would: waiting for a stream
    # with a long token delay would make stopping the simulator slow and unpredictable.
    for request, record in list(app[STATE].active.values()):
        _abort(request, record)


def create_app(config: SimulatorConfig) -> web.Application:
    """Build the simulator's aiohttp application (routes in docs/simulator.md).

    Serve it with ``web.AppRunner(app, handler_cancellation=True)`` so client
    disconnects are observed promptly; :func:`run_simulator` does this for you.
    """
    app = web.Application()
    app[STATE] = SimulatorState(config)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/moderations", _moderations)
    app.router.add_get("/_sim/streams", _get_streams)
    app.router.add_delete("/_sim/streams", _clear_streams)
    app.router.add_get("/_sim/config", _get_config)
    app.router.add_post("/_sim/config", _post_config)
    app.router.add_get("/healthz", _healthz)
    realtime_ws.add_routes(app, app[STATE])
    return app


class RunningSimulator:
    """Handle on a simulator started by :func:`run_simulator`.

    Attributes:
        url: Server root, e.g. ``http://127.0.0.1:54321``.
        base_url: The OpenAI base URL to give a client: ``url + "/v1"``.
        config: The config it was started with (``port`` as requested, maybe 0).
    """

    def __init__(self, app: web.Application, url: str) -> None:
        self._state = app[STATE]
        self.config = self._state.config
        self.url = url
        self.base_url = f"{url}/v1"

    async def streams(self) -> list[dict[str, Any]]:
        """Snapshot of the observation log, oldest first (same as ``GET /_sim/streams``)."""
        return [r.to_json() for r in self._state.records]

    async def clear(self) -> None:
        """Empty the observation log (same as ``DELETE /_sim/streams``)."""
        self._state.records.clear()

    async def configure(self, overrides: Mapping[str, Any]) -> None:
        """Replace the server-wide overrides (same as ``POST /_sim/config``).

        Raises:
            script.RequestError: If a key or value is invalid.
        """
        self._state.configure(overrides)


@asynccontextmanager
async def run_simulator(config: SimulatorConfig) -> AsyncIterator[RunningSimulator]:
    """Serve a simulator in the current event loop for the duration of the block.

    Example::

        async with run_simulator(SimulatorConfig(port=0)) as sim:
            client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="unused")
    """
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        host = f"[{config.host}]" if ":" in config.host else config.host
        yield RunningSimulator(app, f"http://{host}:{port}")
    finally:
        await runner.cleanup()
