"""Switchboard's Python client: Realtime conversations that resume by themselves.

Example::

    async with RealtimeClient(URL, api_key=KEY) as client:
        stream = client.stream_text("Hello!")
        async for delta in stream:
            print(delta, end="")
        print(stream.response.status, stream.response.resumed)
"""

from switchboard_client.backoff import Backoff
from switchboard_client.client import RealtimeClient, RequestFailed, TextStream, Tool
from switchboard_client.errors import (
    AuthenticationError,
    ClientClosed,
    GaveUp,
    PermissionDenied,
    QuotaExceeded,
    ResumeUnavailable,
    SessionNotFound,
    SessionTakenOver,
    SwitchboardClientError,
    TerminalError,
)
from switchboard_client.events import (
    ClientSecret,
    ConnectionState,
    Response,
    ServerEvent,
    StateChange,
    ToolCall,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Backoff",
    "ClientClosed",
    "ClientSecret",
    "ConnectionState",
    "GaveUp",
    "PermissionDenied",
    "QuotaExceeded",
    "RealtimeClient",
    "RequestFailed",
    "Response",
    "ResumeUnavailable",
    "ServerEvent",
    "SessionNotFound",
    "SessionTakenOver",
    "StateChange",
    "SwitchboardClientError",
    "TerminalError",
    "TextStream",
    "Tool",
    "ToolCall",
]
