"""The errors the client raises, and which closes and refusals it retries.

The rule is the server's (docs/errors.md, "Close codes"): close codes
4000-4499 end a connection but keep its session, so the client reconnects and
resumes; 4500-4999 and 1008 are terminal; the other standard codes (1006 for a
dropped socket, 1011, 1012 for a drain, 1013) are followed by a reconnect. At
the handshake, 401, 403, 404, 400 and 410 are terminal (after one refresh of a
token provider's secret for 401); 429, 503 and other 5xx are retried, after the
`Retry-After` the server suggests when it gives one.
"""

from __future__ import annotations

# A client that gets 4501 (its credential refused) asks its token provider once more.
INVALID_API_KEY_CLOSE = 4501


class SwitchboardClientError(Exception):
    """Base of every error this package raises."""


class ClientClosed(SwitchboardClientError):
    """The client was closed (by `close()`), so it sends and delivers nothing more."""


class TerminalError(SwitchboardClientError):
    """The server refused in a way no reconnect can cure; the client stopped.

    Attributes:
        code: the server's error code (`invalid_api_key`, `insufficient_quota`, ...),
            or the close reason when the server gave no code.
        close_code: the WebSocket close code, when a connection was closed.
        status: the HTTP status, when the handshake was refused.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        close_code: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code
        self.status = status


class AuthenticationError(TerminalError):
    """The credential was refused (401 or close 4501), a provider's fresh one too."""


class PermissionDenied(TerminalError):
    """The tenant may not use the model, or the credential may not do this (403, 4503)."""


class SessionNotFound(TerminalError):
    """The session to resume is gone (404, 4504)."""


class SessionTakenOver(TerminalError):
    """Another connection resumed this session (4509)."""


class QuotaExceeded(TerminalError):
    """The tenant's budget is spent (4529)."""


class ResumeUnavailable(TerminalError):
    """The events after the last one seen are no longer in the session's log (410)."""


class GaveUp(SwitchboardClientError):
    """Every reconnect allowed by the backoff's `max_attempts` failed.

    Attributes:
        attempts: how many connection attempts were made in a row.
    """

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


_BY_CLOSE: dict[int, type[TerminalError]] = {
    4501: AuthenticationError,
    4503: PermissionDenied,
    4504: SessionNotFound,
    4509: SessionTakenOver,
    4529: QuotaExceeded,
}

_BY_STATUS: dict[int, type[TerminalError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: SessionNotFound,
    410: ResumeUnavailable,
}


def close_is_terminal(code: int | None) -> bool:
    """True when a connection closed with `code` must not be resumed (None: the
    socket dropped without a close frame, which is resumed)."""
    if code is None:
        return False
    return code == 1008 or 4500 <= code <= 4999


def status_is_terminal(status: int) -> bool:
    """True when a handshake refused with HTTP `status` must not be retried."""
    return status in _BY_STATUS or status == 400


def terminal_close(code: int, reason: str) -> TerminalError:
    """The error for a terminal close."""
    kind = _BY_CLOSE.get(code, TerminalError)
    return kind(f"the server closed the connection: {code} {reason}", code=reason, close_code=code)


def terminal_status(status: int, code: str, message: str) -> TerminalError:
    """The error for a terminal handshake refusal."""
    kind = _BY_STATUS.get(status, TerminalError)
    return kind(
        f"the server refused the connection: {status} {code}: {message}", code=code, status=status
    )
