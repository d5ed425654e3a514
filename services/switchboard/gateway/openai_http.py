"""The OpenAI-compatible HTTP endpoints: `POST /v1/chat/completions` and
`POST /v1/responses`, streaming (SSE, sse.py) or not.

Everything that can refuse a request is checked before its session is made,
and answered with the error's HTTP status and OpenAI's error JSON: the drain
(503), the credential (401: a tenant key or an `ek_` secret as bearer token),
the body (400, 408 for a slow upload, 413), the model (404 for a model the
tenant may not use, as OpenAI answers a model a key cannot see; 403 for
another model than an `ek_` secret's), the tenant's connection limit (429 with
`retry-after`). Then the request becomes a session of its own and one turn
(`StreamPump`); a refusal at the turn's admission (429 with `retry-after`
from the limiter, 503 `server_busy` when the broker sheds load) is still an
HTTP status, as nothing was sent before the first delta.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from switchboard import errors
from switchboard.errors import SwitchboardError, invalid_value
from switchboard.gateway import bounds, chat_completions, handshake, responses_api
from switchboard.gateway.ids import Ids
from switchboard.gateway.metrics import refusal_reason
from switchboard.gateway.resources import Resources
from switchboard.gateway.resume import resume_unavailable
from switchboard.gateway.sse import (
    RESUMABLE_HEADER,
    EventStreamResponse,
    FrameSink,
    StreamPump,
    Translator,
    new_holder,
    parse_frame_id,
)
from switchboard.gateway.stream_format import OPEN_MARKER, Frame, TurnRequest
from switchboard.v1 import common_pb2, session_pb2

log = logging.getLogger(__name__)

Event = dict[str, Any]


def error_response(error: SwitchboardError | Event, api: str) -> JSONResponse:
    """OpenAI's error JSON with the error's HTTP status (and `retry-after`).

    Args:
        error: the error, or the error object a turn's log holds.
    """
    if isinstance(error, SwitchboardError):
        response = handshake.error_response(error)
        code = error.code
    else:
        code = errors.code_from_name(str(error.get("code"))) or common_pb2.ERROR_CODE_INTERNAL_ERROR
        response = JSONResponse({"error": error}, status_code=errors.spec(code).http_status)
    if code == common_pb2.ERROR_CODE_MODEL_NOT_ALLOWED:
        # What OpenAI answers for a model the key cannot use (the SDK's NotFoundError).
        response.status_code = 404
    return response


async def chat_completions_endpoint(request: Request) -> Any:
    """`POST /v1/chat/completions`."""
    return await _serve(
        request,
        "chat.completions",
        chat_completions.parse_request,
        chat_completions.ChatTranslator,
        chat_completions.fold,
    )


async def responses_endpoint(request: Request) -> Any:
    """`POST /v1/responses`."""
    return await _serve(
        request,
        "responses",
        responses_api.parse_request,
        responses_api.ResponsesTranslator,
        responses_api.fold,
    )


async def _serve(
    request: Request,
    api: str,
    parse: Callable[[dict[str, Any]], TurnRequest],
    translator: Callable[[], Translator],
    fold: Callable[[Any, list[Frame]], Event],
) -> Any:
    gateway: Resources = request.app.state.gateway
    last_event_id = request.headers.get("last-event-id")
    try:
        gateway.drainer.check_open("send the request")
        gateway.overload.check("send the request")
        tenant, grant = await handshake.authenticate(
            request, gateway.tenants.current, gateway.client_secrets
        )
        body = await handshake.json_object(
            request, bounds.MAX_GENERATE_BODY_BYTES, timeout_s=bounds.BODY_TIMEOUT_S
        )
        if last_event_id:
            # A resume: the body (the request sent again) is not looked at.
            session, after = await _resumable(gateway, tenant.id, api, last_event_id)
            if grant is not None:
                handshake.check_grant_model(grant, session.config.model)
        else:
            turn_request = parse(body)
            if grant is not None:
                handshake.check_grant_model(grant, turn_request.model)
            tenant.route(turn_request.model)  # model_not_allowed
        holder = new_holder()
        await gateway.gate.open_connection(tenant, holder)
    except SwitchboardError as error:
        return _refuse(gateway, request, api, error)
    resumable = request.headers.get(RESUMABLE_HEADER, "").lower() == "true"
    made = translator()
    if last_event_id:
        sink = FrameSink(session.id, made, after, gateway.settings.max_buffered_bytes)
        pump = StreamPump(
            gateway, tenant, session, sink, api=api, holder=holder, resumable=resumable
        )
        pump.resume()
    else:
        try:
            session = await _new_session(gateway, tenant.id, turn_request)
        except SwitchboardError as error:
            await gateway.gate.close_connection(tenant, holder)
            return _refuse(gateway, request, api, error)
        sink = FrameSink(session.id, made, (0, -1), gateway.settings.max_buffered_bytes)
        pump = StreamPump(
            gateway, tenant, session, sink, api=api, holder=holder, resumable=resumable
        )
        pump.start(turn_request)
    gateway.drainer.add(pump)
    assert pump.task is not None
    pump.task.add_done_callback(lambda _: gateway.drainer.discard(pump))
    log.info(
        "stream resumed" if last_event_id else "stream started",
        extra={"tenant_id": tenant.id, "session_id": session.id, "api": api},
    )

    def whole(frames: list[Frame]) -> Event:
        return fold(made, frames)

    return EventStreamResponse(
        pump,
        fold=None if last_event_id or turn_request.stream else whole,
        error_response=lambda error: error_response(error, api),
    )


async def _new_session(
    gateway: Resources, tenant_id: str, turn_request: TurnRequest
) -> session_pb2.Session:
    """The request's session: its settings, and its messages as items."""
    backends = gateway.backends
    session = await backends.create_session(tenant_id, turn_request.config)
    ids = Ids()
    for item in turn_request.items:
        item.id = ids.new("item")
        await backends.append_item(tenant_id, session.id, item)
    return session


async def _resumable(
    gateway: Resources, tenant_id: str, api: str, last_event_id: str
) -> tuple[session_pb2.Session, tuple[int, int]]:
    """The session of the stream `last_event_id` names (the tenant's own), and
    where in it the client left off.

    Raises:
        SwitchboardError: `invalid_value` for an id that is not a stream's or one
            of the other API's, `session_not_found` (404) for a stream that is
            gone (its session expired) or another tenant's, `resume_unavailable`
            (410) when its log no longer holds the whole stream.
    """
    session_id, seq, index = parse_frame_id(last_event_id)
    backends = gateway.backends
    session = await backends.get_session(tenant_id, session_id)
    page = await backends.read_events(tenant_id, session_id, 0, limit=1)
    if page.trimmed_seq > 0 or seq > page.last_seq:
        raise resume_unavailable()
    first = orjson.loads(page.events[0].payload) if page.events else {}
    if first.get("type") != OPEN_MARKER or first.get("api") != api:
        raise invalid_value(
            "Last-Event-ID", f"'Last-Event-ID' is not an event id of a {api} stream."
        )
    return session, (seq, index)


def _refuse(gateway: Resources, request: Request, api: str, error: SwitchboardError) -> Response:
    reason = refusal_reason(error.name)
    gateway.refusals.info("request refused", code=error.name, path=request.url.path)
    if reason == "quota":
        gateway.metrics.rejections.labels(error.name, "unknown").inc()
    response = error_response(error, api)
    gateway.metrics.sse_requests.labels(api, str(response.status_code)).inc()
    return response
