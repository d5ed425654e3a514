"""The upstream end of a voice session: one Realtime WebSocket to a `kind: realtime` upstream.

The URL is the upstream's base URL with `ws(s)` for `http(s)` and
`/realtime?model=...` appended (OpenAI's `wss://api.openai.com/v1/realtime`);
the key goes in the `Authorization` header. Neither ever appears in an error:
a refused or failed connection is a `SwitchboardError` that names no URL and
no key, because its message reaches the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import quote, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

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


def realtime_url(upstream: Upstream, model: str) -> str:
    """The WebSocket URL of `upstream`'s Realtime endpoint for `model`."""
    parts = urlsplit(upstream.base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/realtime"
    return urlunsplit((scheme, parts.netloc, path, "model=" + quote(model, safe=""), ""))


async def connect(
    upstream: Upstream, model: str, *, timeout_s: float, headers: Mapping[str, str]
) -> ClientConnection:
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
    sent = dict(headers)
    key = upstream.api_key.reveal()
    if key:
        sent["Authorization"] = f"Bearer {key}"
    try:
        return await websockets.connect(
            realtime_url(upstream, model),
            additional_headers=sent,
            open_timeout=timeout_s,
            max_size=MAX_EVENT_BYTES,
            # Audio is base64 noise to deflate: compression costs CPU and latency for little.
            compression=None,
            user_agent_header="switchboard-broker",
        )
    except websockets.exceptions.InvalidStatus as exc:
        raise refusal(exc.response.status_code) from None
    except TimeoutError:
        raise UpstreamTimeout("The upstream did not open the Realtime session in time.") from None
    except (OSError, websockets.exceptions.WebSocketException) as exc:
        # The exception text may hold the host; log its type only.
        log.warning(
            "realtime upstream unreachable",
            extra={"upstream": upstream.name, "error": type(exc).__name__},
        )
        raise UpstreamError("The upstream could not be reached.") from None


def refusal(status: int) -> SwitchboardError:
    """The error of an upstream that answered the WebSocket handshake with `status`."""
    if status == 429:
        return UpstreamRateLimited("The upstream is rate limiting Realtime sessions.")
    if status in (401, 403):
        return UpstreamError("The upstream refused the broker's credentials for this model.")
    if status == 404:
        return UpstreamError("The upstream has no Realtime endpoint for this model.")
    return UpstreamError(f"The upstream refused the Realtime session (HTTP {status}).")
