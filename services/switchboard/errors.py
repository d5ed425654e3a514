"""The one catalogue of Switchboard errors and how each crosses every transport.

`ErrorCode` comes from the proto (switchboard.v1.ErrorCode). Each code has one
`Spec`: the gRPC status a backend answers with, the HTTP status of a refused
request, the Realtime `error.type`, and the WebSocket close code when the error
ends the connection. Services raise a `SwitchboardError` subclass; the transports
translate it with the helpers here, so a code means the same thing everywhere.
The table is documented for users in docs/errors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from switchboard.v1 import common_pb2

ErrorCode = common_pb2.ErrorCode

# Trailing-metadata key that carries the code across a gRPC call.
GRPC_CODE_KEY = "switchboard-error-code"
GRPC_PARAM_KEY = "switchboard-error-param"
GRPC_RETRY_KEY = "switchboard-retry-after"

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
AUTH_ERROR = "authentication_error"
RATE_LIMIT = "rate_limit_error"


# WebSocket close codes follow one rule a client can act on without the docs (as
# Centrifugo splits reconnect from terminal codes): 4000-4499 end a connection but
# keep its session, so the client reconnects and resumes; 4500-4999 are terminal,
# and reconnecting would be refused again. The standard codes keep the meaning
# official clients give them: 1008 (policy) is terminal; 1009, 1011, 1012 (drain)
# and 1013 (overload) are followed by a reconnect with backoff.
RESUMABLE_CLOSE_CODES = range(4000, 4500)
TERMINAL_CLOSE_CODES = range(4500, 5000)


def close_is_terminal(code: int) -> bool:
    """True when a client must not reconnect after a close with `code`."""
    return code in TERMINAL_CLOSE_CODES or code == 1008


@dataclass(frozen=True, slots=True)
class Spec:
    grpc_status: grpc.StatusCode
    http_status: int
    error_type: str
    # WebSocket close code when this error ends a connection; None keeps it open.
    # Its range says whether the client may resume (see RESUMABLE_CLOSE_CODES).
    close_code: int | None = None
    # The same request may succeed later (after `retry_after`, when given).
    retryable: bool = False


_C = common_pb2
SPECS: dict[int, Spec] = {
    _C.ERROR_CODE_INVALID_JSON: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_BINARY_FRAME_UNSUPPORTED: Spec(
        grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST
    ),
    _C.ERROR_CODE_FRAME_TOO_LARGE: Spec(grpc.StatusCode.INVALID_ARGUMENT, 413, INVALID_REQUEST),
    _C.ERROR_CODE_UNKNOWN_EVENT_TYPE: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_MISSING_REQUIRED_PARAMETER: Spec(
        grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST
    ),
    _C.ERROR_CODE_INVALID_VALUE: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_FIELD_LOCKED: Spec(grpc.StatusCode.PERMISSION_DENIED, 403, INVALID_REQUEST),
    _C.ERROR_CODE_SESSION_TAKEN_OVER: Spec(grpc.StatusCode.ABORTED, 409, INVALID_REQUEST, 4509),
    _C.ERROR_CODE_RESUME_UNAVAILABLE: Spec(grpc.StatusCode.OUT_OF_RANGE, 410, INVALID_REQUEST),
    _C.ERROR_CODE_IDLE_TIMEOUT: Spec(grpc.StatusCode.DEADLINE_EXCEEDED, 408, INVALID_REQUEST, 4010),
    _C.ERROR_CODE_SESSION_EXPIRED: Spec(
        grpc.StatusCode.DEADLINE_EXCEEDED, 440, INVALID_REQUEST, 4011
    ),
    _C.ERROR_CODE_UNKNOWN_PARAMETER: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_VALUE_TOO_LARGE: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_JSON_TOO_DEEP: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_UNSUPPORTED_FEATURE: Spec(grpc.StatusCode.UNIMPLEMENTED, 400, INVALID_REQUEST),
    _C.ERROR_CODE_ITEM_NOT_FOUND: Spec(grpc.StatusCode.NOT_FOUND, 404, INVALID_REQUEST),
    _C.ERROR_CODE_CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE: Spec(
        grpc.StatusCode.FAILED_PRECONDITION, 409, INVALID_REQUEST
    ),
    _C.ERROR_CODE_RESPONSE_CANCEL_NOT_ACTIVE: Spec(
        grpc.StatusCode.FAILED_PRECONDITION, 409, INVALID_REQUEST
    ),
    _C.ERROR_CODE_SESSION_NOT_FOUND: Spec(grpc.StatusCode.NOT_FOUND, 404, INVALID_REQUEST, 4504),
    _C.ERROR_CODE_INVALID_API_KEY: Spec(grpc.StatusCode.UNAUTHENTICATED, 401, AUTH_ERROR, 4501),
    _C.ERROR_CODE_MODEL_NOT_ALLOWED: Spec(
        grpc.StatusCode.PERMISSION_DENIED, 403, INVALID_REQUEST, 4503
    ),
    _C.ERROR_CODE_PERMISSION_DENIED: Spec(grpc.StatusCode.PERMISSION_DENIED, 403, AUTH_ERROR, 4503),
    _C.ERROR_CODE_RATE_LIMIT_EXCEEDED: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, RATE_LIMIT, retryable=True
    ),
    _C.ERROR_CODE_INSUFFICIENT_QUOTA: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, RATE_LIMIT, 4529
    ),
    _C.ERROR_CODE_SERVER_BUSY: Spec(grpc.StatusCode.UNAVAILABLE, 503, SERVER_ERROR, 1013, True),
    _C.ERROR_CODE_SLOW_CONSUMER: Spec(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, SERVER_ERROR, 4008),
    _C.ERROR_CODE_SESSION_STORE_UNAVAILABLE: Spec(
        grpc.StatusCode.UNAVAILABLE, 503, SERVER_ERROR, retryable=True
    ),
    _C.ERROR_CODE_SERVICE_UNAVAILABLE: Spec(
        grpc.StatusCode.UNAVAILABLE, 503, SERVER_ERROR, retryable=True
    ),
    _C.ERROR_CODE_INVALID_AUDIO: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_AUDIO_RATE_EXCEEDED: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, INVALID_REQUEST
    ),
    _C.ERROR_CODE_INPUT_AUDIO_BUFFER_FULL: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 400, INVALID_REQUEST
    ),
    # A notice on a resumed voice session, not a refusal: the session goes on.
    _C.ERROR_CODE_RESUME_AUDIO_LOST: Spec(grpc.StatusCode.DATA_LOSS, 410, SERVER_ERROR),
    _C.ERROR_CODE_UPSTREAM_ERROR: Spec(grpc.StatusCode.UNAVAILABLE, 502, SERVER_ERROR, None, True),
    _C.ERROR_CODE_UPSTREAM_RATE_LIMITED: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, RATE_LIMIT, None, True
    ),
    _C.ERROR_CODE_UPSTREAM_TIMEOUT: Spec(
        grpc.StatusCode.DEADLINE_EXCEEDED, 504, SERVER_ERROR, None, True
    ),
    _C.ERROR_CODE_UPSTREAM_STREAM_BROKEN: Spec(grpc.StatusCode.ABORTED, 502, SERVER_ERROR),
    # Over gRPC: the broker holds no such call to attach to (BrokerService.Attach).
    _C.ERROR_CODE_RESPONSE_INTERRUPTED: Spec(grpc.StatusCode.NOT_FOUND, 503, SERVER_ERROR),
    _C.ERROR_CODE_TOOL_NOT_FOUND: Spec(grpc.StatusCode.NOT_FOUND, 404, INVALID_REQUEST),
    _C.ERROR_CODE_TOOL_NOT_ALLOWED: Spec(grpc.StatusCode.PERMISSION_DENIED, 403, INVALID_REQUEST),
    _C.ERROR_CODE_TOOL_INVALID_ARGUMENTS: Spec(
        grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST
    ),
    _C.ERROR_CODE_TOOL_TIMEOUT: Spec(grpc.StatusCode.DEADLINE_EXCEEDED, 504, SERVER_ERROR),
    _C.ERROR_CODE_TOOL_EXECUTION_FAILED: Spec(grpc.StatusCode.INTERNAL, 502, SERVER_ERROR),
    _C.ERROR_CODE_TOOL_ROUNDS_EXCEEDED: Spec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 400, INVALID_REQUEST
    ),
    _C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED: Spec(
        grpc.StatusCode.PERMISSION_DENIED, 403, INVALID_REQUEST
    ),
    _C.ERROR_CODE_MCP_LIST_TOOLS_FAILED: Spec(grpc.StatusCode.UNAVAILABLE, 502, SERVER_ERROR),
    _C.ERROR_CODE_INPUT_FLAGGED: Spec(grpc.StatusCode.INVALID_ARGUMENT, 400, INVALID_REQUEST),
    _C.ERROR_CODE_INTERNAL_ERROR: Spec(grpc.StatusCode.INTERNAL, 500, SERVER_ERROR, 1011),
}

_PREFIX = "ERROR_CODE_"

# An error's message and param reach clients, logs and gRPC trailers (whose
# metadata is limited to a few KiB): cut them, whatever input they quote.
MAX_MESSAGE_CHARS = 1024
MAX_PARAM_CHARS = 256


def code_name(code: int) -> str:
    """The wire name of a code: `ERROR_CODE_ITEM_NOT_FOUND` -> `item_not_found`."""
    return ErrorCode.Name(code).removeprefix(_PREFIX).lower()  # type: ignore[arg-type]


def code_from_name(name: str) -> int | None:
    """The inverse of `code_name`; None for a name that is not in the catalogue."""
    try:
        return int(ErrorCode.Value(_PREFIX + name.upper()))
    except ValueError:
        return None


def spec(code: int) -> Spec:
    return SPECS.get(code, SPECS[common_pb2.ERROR_CODE_INTERNAL_ERROR])


class SwitchboardError(Exception):
    """An error with a stable code. Its message is safe to show to the client.

    Never put keys, tokens or prompt text in the message: it reaches clients and logs.
    """

    code: int = common_pb2.ERROR_CODE_INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        message = _cut(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.param = None if param is None else _cut(param, MAX_PARAM_CHARS)
        self.retry_after = retry_after

    @property
    def name(self) -> str:
        return code_name(self.code)

    @property
    def spec(self) -> Spec:
        return spec(self.code)

    def to_event_error(self, client_event_id: str | None = None) -> dict[str, Any]:
        """The `error` object of a Realtime `error` event."""
        return {
            "type": self.spec.error_type,
            "code": self.name,
            "message": self.message,
            "param": self.param,
            "event_id": client_event_id,
        }

    def to_http_body(self) -> dict[str, Any]:
        """An OpenAI-style JSON error body for an HTTP response."""
        return {
            "error": {
                "type": self.spec.error_type,
                "code": self.name,
                "message": self.message,
                "param": self.param,
            }
        }

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        trailers = [(GRPC_CODE_KEY, self.name)]
        if self.param:
            trailers.append((GRPC_PARAM_KEY, self.param))
        if self.retry_after is not None:
            trailers.append((GRPC_RETRY_KEY, f"{self.retry_after:.3f}"))
        return tuple(trailers)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def quote(value: object, limit: int = 64) -> str:
    """A client's value for an error message: in single quotes, cut to `limit`
    characters (an error never repeats unbounded input)."""
    text = value if isinstance(value, str) else repr(value)
    return "'" + _cut(text, limit) + "'"


class InvalidRequest(SwitchboardError):
    """A client event that cannot be served as sent (code set per case)."""

    code = common_pb2.ERROR_CODE_INVALID_VALUE


def missing_parameter(param: str) -> InvalidRequest:
    """`missing_required_parameter` naming the field, worded as OpenAI words it."""
    return InvalidRequest(
        f"Missing required parameter: '{param}'.",
        code=common_pb2.ERROR_CODE_MISSING_REQUIRED_PARAMETER,
        param=param,
    )


def invalid_value(param: str, message: str) -> InvalidRequest:
    """`invalid_value` naming the field."""
    return InvalidRequest(message, code=common_pb2.ERROR_CODE_INVALID_VALUE, param=param)


def value_too_large(param: str, limit: str) -> InvalidRequest:
    """`value_too_large` naming the field and its limit ("64 characters")."""
    return InvalidRequest(
        f"'{param}' is over its limit of {limit} (docs/input-limits.md).",
        code=common_pb2.ERROR_CODE_VALUE_TOO_LARGE,
        param=param,
    )


class ItemNotFound(SwitchboardError):
    code = common_pb2.ERROR_CODE_ITEM_NOT_FOUND


class SessionNotFound(SwitchboardError):
    code = common_pb2.ERROR_CODE_SESSION_NOT_FOUND


class SessionTakenOver(SwitchboardError):
    code = common_pb2.ERROR_CODE_SESSION_TAKEN_OVER


class AuthenticationFailed(SwitchboardError):
    code = common_pb2.ERROR_CODE_INVALID_API_KEY


class SessionStoreUnavailable(SwitchboardError):
    code = common_pb2.ERROR_CODE_SESSION_STORE_UNAVAILABLE


class ServiceUnavailable(SwitchboardError):
    code = common_pb2.ERROR_CODE_SERVICE_UNAVAILABLE


class UpstreamError(SwitchboardError):
    code = common_pb2.ERROR_CODE_UPSTREAM_ERROR


class UpstreamRateLimited(SwitchboardError):
    code = common_pb2.ERROR_CODE_UPSTREAM_RATE_LIMITED


class UpstreamTimeout(SwitchboardError):
    code = common_pb2.ERROR_CODE_UPSTREAM_TIMEOUT


class UpstreamStreamBroken(SwitchboardError):
    code = common_pb2.ERROR_CODE_UPSTREAM_STREAM_BROKEN


class ServerBusy(SwitchboardError):
    code = common_pb2.ERROR_CODE_SERVER_BUSY


class InternalError(SwitchboardError):
    code = common_pb2.ERROR_CODE_INTERNAL_ERROR


async def abort_with(context: Any, error: SwitchboardError) -> None:
    """Abort a grpc.aio servicer call with the error's status, code and message."""
    context.set_trailing_metadata(error.grpc_trailers())
    await context.abort(error.spec.grpc_status, error.message)


def from_rpc_error(exc: grpc.RpcError, *, service: str) -> SwitchboardError:
    """Rebuild the SwitchboardError a backend raised, from a failed gRPC call.

    A call that failed without our trailers (the backend is down, a deadline
    passed) becomes `service_unavailable` naming the service, never a traceback.
    """
    trailers = dict(_metadata(exc))
    name = trailers.get(GRPC_CODE_KEY)
    code = code_from_name(name) if name else None
    if code is not None:
        retry = trailers.get(GRPC_RETRY_KEY)
        return SwitchboardError(
            str(_details(exc)),
            code=code,
            param=trailers.get(GRPC_PARAM_KEY),
            retry_after=float(retry) if retry else None,
        )
    status = exc.code() if hasattr(exc, "code") else None
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceUnavailable(f"The {service} service did not answer in time.")
    if status == grpc.StatusCode.CANCELLED:
        return ServiceUnavailable(f"The call to the {service} service was cancelled.")
    return ServiceUnavailable(f"The {service} service is unavailable.")


def _metadata(exc: grpc.RpcError) -> list[tuple[str, str]]:
    getter = getattr(exc, "trailing_metadata", None)
    raw = getter() if getter else None
    return [(str(k), str(v)) for k, v in (raw or ())]


def _details(exc: grpc.RpcError) -> str:
    getter = getattr(exc, "details", None)
    return str(getter() if getter else "") or "error"
