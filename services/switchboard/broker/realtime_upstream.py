"""The upstream end of a voice session: one Realtime WebSocket to a `kind: realtime` upstream.

The URL is the upstream's base URL with `ws(s)` for `http(s)` and
`/realtime?model=...` appended (OpenAI's `wss://api.openai.com/v1/realtime`);
the key goes in the `Authorization` header. Neither ever appears in an error:
a refused or failed connection is a `SwitchboardError` that names no URL and
no key, because its message reaches the client.

The socket is aiohttp's WebSocket client, used through `RealtimeSocket`
(`recv`, `send`, `close`). A voice session sends some fifty events a second
upstream and receives as many; aiohttp masks what it sends in C with a key
from `random` and parses frames in C, where `websockets` (the client before)
read `os.urandom` and masked in Python per frame: at a hundred sessions that
send path was over half the broker's time (docs/voice.md#performance).
As for the chat upstreams, the proxy variables are honoured (read once, by
`env_proxy`) and no cookies kept; a redirect of the handshake is followed
(as `websockets` did), the key dropped when it leads to another origin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from switchboard.broker.clients import env_proxy
from switchboard.errors import (
    SwitchboardError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from switchboard.tenancy import Upstream

log = logging.getLogger(__name__)

# A Realtime event is at most a few hundred KiB (an audio delta is ~10 KiB); the
# gateway bounds client events far below this.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# A ping when the upstream has said nothing for this long; no pong within half
# of it ends the session (`websockets`' keepalive pinged every 20 s too).
HEARTBEAT_S = 20.0
# The longest a close waits for the upstream's close frame.
CLOSE_TIMEOUT_S = 10.0


class UpstreamClosed(Exception):
    """The upstream socket is closed (by either side, or the connection broke)."""


class RealtimeSocket:
    """One open Realtime WebSocket: text events in and out, as bytes."""

    def __init__(
        self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse[Literal[False]]
    ) -> None:
        self._session = session
        self._ws = ws

    async def recv(self, decode: bool = False) -> bytes:
        """The next event's bytes (`decode` is ignored: events stay bytes).

        Raises:
            UpstreamClosed: the socket closed or broke.
        """
        message = await self._ws.receive()
        if message.type is aiohttp.WSMsgType.TEXT or message.type is aiohttp.WSMsgType.BINARY:
            data: bytes = message.data
            return data
        raise UpstreamClosed(message.type.name)

    async def send(self, message: bytes | str, text: bool = True) -> None:
        """Send one event as a text frame.

        Raises:
            UpstreamClosed: the socket is closing or closed.
        """
        data = message.encode() if isinstance(message, str) else message
        try:
            await self._ws.send_frame(data, aiohttp.WSMsgType.TEXT)
        except (aiohttp.ClientConnectionResetError, ConnectionError) as exc:
            raise UpstreamClosed(type(exc).__name__) from None

    async def close(self) -> None:
        """Close the socket (and its connection); idempotent."""
        try:
            await self._ws.close()
        finally:
            await self._session.close()


def realtime_url(upstream: Upstream, model: str) -> str:
    """The WebSocket URL of `upstream`'s Realtime endpoint for `model`."""
    parts = urlsplit(upstream.base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/realtime"
    return urlunsplit((scheme, parts.netloc, path, "model=" + quote(model, safe=""), ""))


async def connect(
    upstream: Upstream, model: str, *, timeout_s: float, headers: Mapping[str, str]
) -> RealtimeSocket:
    """An open Realtime WebSocket to `upstream` for `model`.

    Args:
        upstream: a `kind: realtime` upstream; its key, if any, is sent as a bearer token.
        model: the upstream model.
        timeout_s: the longest the connection and the handshake may take.
        headers: more headers (the trace context).

    Raises:
        UpstreamRateLimited: the upstream answered 429.
        UpstreamTimeout: no handshake within `timeout_s`.
        UpstreamError: refused (any other status) or unreachable.
    """
    sent = {**headers, "User-Agent": "switchboard-broker"}
    key = upstream.api_key.reveal()
    if key:
        sent["Authorization"] = f"Bearer {key}"
    # One connection per session: no pool, no cookies, nothing kept after the close.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,  # the proxy variables are read once, as for the chat upstreams
    )
    try:
        async with asyncio.timeout(timeout_s):
            ws = await session.ws_connect(
                realtime_url(upstream, model),
                headers=sent,
                proxy=env_proxy(upstream.base_url),
                max_msg_size=MAX_EVENT_BYTES,
                # Audio is base64 noise to deflate: compression costs CPU and latency for little.
                compress=0,
                heartbeat=HEARTBEAT_S,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S),
                decode_text=False,
            )
    except BaseException as exc:
        await session.close()
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            raise refusal(exc.status) from None
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(
                "The upstream did not open the Realtime session in time."
            ) from None
        if isinstance(exc, (OSError, aiohttp.ClientError)):
            # The exception text may hold the host; log its type only.
            log.warning(
                "realtime upstream unreachable",
                extra={"upstream": upstream.name, "error": type(exc).__name__},
            )
            raise UpstreamError("The upstream could not be reached.") from None
        raise
    return RealtimeSocket(session, ws)


def refusal(status: int) -> SwitchboardError:
    """The error of an upstream that answered the WebSocket handshake with `status`."""
    if status == 429:
        return UpstreamRateLimited("The upstream is rate limiting Realtime sessions.")
    if status in (401, 403):
        return UpstreamError("The upstream refused the broker's credentials for this model.")
    if status == 404:
        return UpstreamError("The upstream has no Realtime endpoint for this model.")
    return UpstreamError(f"The upstream refused the Realtime session (HTTP {status}).")
