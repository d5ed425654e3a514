"""The typed values the client hands to the application.

Server events are kept as the JSON the server sent (`ServerEvent.data`, the
OpenAI Realtime shape), with typed accessors for what applications use most;
a finished response is a `Response`, marked `resumed` or `interrupted`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


class ConnectionState(enum.Enum):
    """Where the client's connection is; see `StateChange`."""

    CONNECTING = "connecting"  # the first connection is being opened
    CONNECTED = "connected"  # events flow
    RESUMING = "resuming"  # the connection was lost; reconnecting to resume the session
    CLOSED = "closed"  # closed by the application, or given up (see `StateChange.error`)


@dataclass(frozen=True)
class StateChange:
    """A change of connection state, given to the `on_state` callback.

    Attributes:
        state: the new state.
        attempt: the connection attempt this is about (1 for the first).
        delay_s: RESUMING: how long the client waits before the attempt.
        close_code: the close code (or None for a dropped socket) that ended the
            last connection.
        reason: a short word on why (`dropped`, `draining`, `server_busy`, ...).
        error: CLOSED after giving up: the error `events()` raises.
    """

    state: ConnectionState
    attempt: int = 0
    delay_s: float = 0.0
    close_code: int | None = None
    reason: str = ""
    error: Exception | None = None


@dataclass(frozen=True)
class ClientSecret:
    """A credential from a token provider, with when it expires (unix seconds).

    The client asks the provider again before `expires_at` passes (and whenever
    the server refuses the credential).
    """

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:  # never print the secret itself
        return f"ClientSecret(value=<{len(self.value)} chars>, expires_at={self.expires_at})"


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made."""

    call_id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> JSON:
        """The arguments as JSON (an object; `{}` when empty)."""
        value = json.loads(self.arguments) if self.arguments.strip() else {}
        if not isinstance(value, dict):
            raise ValueError("function call arguments are not a JSON object")
        return value


@dataclass(frozen=True)
class Response:
    """A finished response: its `response.done`, and how its stream went.

    Attributes:
        id: the response id.
        status: `completed`, `cancelled`, `incomplete` or `failed`.
        text: the text the client received for it, deltas joined in order.
        tool_calls: the function calls in its output.
        resumed: the connection was lost while it streamed, and the client
            resumed it from the session's log: nothing was lost or repeated.
        interrupted: the server could not finish it after a loss (the gateway
            and its model call were both gone, `response_interrupted`, or the
            client stayed away past the server's grace, `client_disconnected`).
        data: the `response` object of `response.done`.
    """

    id: str
    status: str
    text: str
    tool_calls: tuple[ToolCall, ...]
    resumed: bool
    interrupted: bool
    data: JSON = field(repr=False)

    @property
    def error_code(self) -> str | None:
        """The error code of a `failed` response."""
        details = self.data.get("status_details") or {}
        error = details.get("error") or {}
        code = error.get("code")
        return code if isinstance(code, str) else None


@dataclass(frozen=True)
class ServerEvent:
    """One server event, delivered exactly once and in the order sent.

    Attributes:
        type: the event type (`response.output_text.delta`, ...).
        event_id: the server's id ("" for the few events not in the session's log).
        data: the event as the server sent it.
        replayed: it was sent again by a resume (the client had not seen it).
        response: for `response.done`, the finished response.
    """

    type: str
    event_id: str
    data: JSON = field(repr=False)
    replayed: bool = False
    response: Response | None = None

    @property
    def delta(self) -> str:
        """The text of a `*.delta` event ("" for others)."""
        delta = self.data.get("delta")
        return delta if isinstance(delta, str) else ""

    @property
    def response_id(self) -> str | None:
        value = self.data.get("response_id")
        if value is None and isinstance(self.data.get("response"), dict):
            value = self.data["response"].get("id")
        return value if isinstance(value, str) else None

    @property
    def error_code(self) -> str | None:
        """The code of an `error` event."""
        error = self.data.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) else None
