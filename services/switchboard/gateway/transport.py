"""The gateway's HTTP and WebSocket transport: uvicorn's, bounded and quiet.

uvicorn (0.54) parses HTTP with httptools, which accepts a request head of any
size and takes as long as the client likes to send it, and hands WebSocket
handshakes to the `websockets` sans-I/O protocol, whose parser refuses lines
over 8 KiB (and malformed heads) by closing its side, which uvicorn ignores:
the socket stayed open forever. It also logs an error line for every refused
handshake (a denial response never marks the handshake complete) and a
traceback for every text frame that is not UTF-8.

`protocols(settings)` returns the two protocol classes the gateway runs
uvicorn with, which add the request-head bounds and the handshake time of
docs/input-limits.md, answer a head the WebSocket parser refused, and log a
refusal as one rate-limited `info` line without quoting the request.

The WebSocket protocol also offers the app a cheaper way to send server
events: `scope["extensions"][SEND_FRAMES]` (`send_frames`) takes already
encoded JSON texts and writes them as text frames, all of a batch in one
`transport.write`, instead of one `websocket.send` message per event through
Starlette's and uvicorn's layers (with a str encoded again each time). It
frames them itself (a two- to ten-byte head each) unless an extension was
negotiated (the gateway runs without permessage-deflate), then through the
`websockets` protocol. It waits on the same flow control and fails as
uvicorn's `send` would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState, SecurityError
from websockets.protocol import State

from switchboard.config import GatewaySettings
from switchboard.gateway import bounds
from switchboard.telemetry.logs import RateLimitedLog

log = logging.getLogger(__name__)

# What uvicorn's protocols log through: its per-handshake info lines quote the
# request path and query, so only its warnings and errors (a bug in the app) pass.
_LIBRARY_LOG = logging.getLogger(__name__ + ".uvicorn")
_LIBRARY_LOG.setLevel(logging.WARNING)

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}
# The ASGI scope extension under which an accepted WebSocket offers `send_frames`.
SEND_FRAMES = "switchboard.send_frames"

# "GET " + target + " HTTP/1.1\r\n": what a request line adds to its target.
_REQUEST_LINE_EXTRA = 20


class _Refused(Exception):
    """A request head over a bound: answered with `status`, then closed."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def _plain_response(status: int, text: str) -> bytes:
    body = text.encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with the request-head bounds and the handshake time.

    The timer runs from the connection (or the start of the next request on a
    kept-alive one) to the end of the request head; the bounds are checked as
    httptools reports the target and each header.
    """

    handshake_timeout_s = 10.0
    refusals: RateLimitedLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _LIBRARY_LOG
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.handshake_timeout_s, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(_Refused(408, "handshake_timeout"))

    def _refuse(self, refusal: _Refused) -> None:
        self._refused = True
        self._cancel_head_timer()
        self.refusals.info("request refused", status=refusal.status, reason=refusal.why)
        self.transport.write(_plain_response(refusal.status, refusal.why.replace("_", " ")))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refusal = exc.__context__
            if isinstance(refusal, _Refused):
                self._refuse(refusal)
            else:
                raise
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self._refuse(_Refused(400, "invalid_http_request"))

    # --- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_count = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) + _REQUEST_LINE_EXTRA > bounds.MAX_REQUEST_LINE_BYTES:
            raise _Refused(414, "request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools may report one header in pieces; each piece counts.
        line = len(name) + len(value) + 4
        self._head_bytes += line
        self._header_count += 1
        if line > bounds.MAX_HEADER_LINE_BYTES:
            raise _Refused(431, "header_too_long")
        if self._head_bytes > bounds.MAX_HEAD_BYTES:
            raise _Refused(431, "headers_too_large")
        if self._header_count > bounds.MAX_HEADERS:
            raise _Refused(431, "too_many_headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()


class QuietWebSocketProtocol(WebSocketsSansIOProtocol):
    """The `websockets` sans-I/O protocol as uvicorn drives it, with three fixes:
    a request head its parser refused is answered (400, or 431 over its limits)
    instead of left hanging; a denial response completes the handshake (no
    error line); a text frame that is not UTF-8 closes with 1007 and one info
    line, not a traceback."""

    refusals: RateLimitedLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _LIBRARY_LOG
        # The `websockets` protocol logs each connection and refusal at info.
        self.conn.logger = _LIBRARY_LOG
        # After a protocol failure: what the client still sends is read and dropped.
        self._discarding = False

    def handle_parser_exception(self) -> None:
        """Fail the connection (a frame over the size cap, 1009; invalid UTF-8,
        1007) as RFC 6455 and the `websockets` protocol mean it: the close frame,
        then a half-close, reading and dropping what the client still sends
        until it closes too (or the close timeout). uvicorn closed at once, so a
        client still sending got a reset and never saw the close code."""
        assert self.conn.close_sent is not None
        close = self.conn.close_sent
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": close.code, "reason": close.reason}
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self._discarding = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        failure = self.conn.handshake_exc
        if failure is not None and not self.handshake_initiated and not self.close_sent:
            too_large = isinstance(failure.__cause__, SecurityError)
            status, why = (431, "headers_too_large") if too_large else (400, "invalid_handshake")
            self.refusals.info("request refused", status=status, reason=why)
            self.close_sent = True
            self.handshake_complete = True
            self.transport.write(_plain_response(status, why.replace("_", " ")))
            self.transport.close()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # only a handshake that goes on has one
        if scope is not None:
            scope["extensions"][SEND_FRAMES] = self.send_frames

    async def send_frames(self, texts: Sequence[bytes]) -> None:
        """Send each of `texts` (UTF-8 JSON) as a text frame, in one write; as the
        app's `websocket.send` messages would be, flow control included.

        Raises:
            ClientDisconnected: the connection is lost (an `OSError`).
            RuntimeError: the app closed the socket, or never accepted it.
        """
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            raise RuntimeError("The WebSocket is not open for sending.")
        conn = self.conn
        if conn.extensions or conn.expect_continuation_frame or conn.state is not State.OPEN:
            # What `send_text` would refuse, or frames an extension must shape.
            try:
                for text in texts:
                    conn.send_text(text)
            except InvalidState:
                raise ClientDisconnected() from None
            self.transport.write(b"".join(conn.data_to_send()))
            return
        # Unmasked, unfragmented text frames, as `send_text` serializes them
        # without its per-frame objects (RFC 6455 section 5.2).
        chunks = conn.data_to_send()
        for text in texts:
            chunks.append(_frame_head(len(text)))
            chunks.append(text)
        self.transport.write(b"".join(chunks))

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # uvicorn forgets this for denial responses, and then logs an error.
            self.handshake_complete = True

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type != "text" or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.refusals.info("frame refused", close=1007, reason="invalid_utf8")
            self.conn.send_close(1007, "invalid UTF-8")
            self.handle_parser_exception()
            return
        self.queue.put_nowait({"type": "websocket.receive", "text": text})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()


def _frame_head(length: int) -> bytes:
    """The head of a final, unmasked text frame carrying `length` bytes."""
    if length < 126:
        return _TEXT_HEADS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


_TEXT_HEADS = [bytes((0x81, length)) for length in range(126)]


def protocols(
    settings: GatewaySettings,
) -> tuple[type[BoundedHttpProtocol], type[QuietWebSocketProtocol]]:
    """The HTTP and WebSocket protocol classes for uvicorn (`http=`, `ws=`),
    bound to the settings and sharing one rate-limited refusal log."""
    refusals = RateLimitedLog(log)
    http = type(
        "BoundedHttpProtocol",
        (BoundedHttpProtocol,),
        {"handshake_timeout_s": settings.handshake_timeout_s, "refusals": refusals},
    )
    ws = type("QuietWebSocketProtocol", (QuietWebSocketProtocol,), {"refusals": refusals})
    return http, ws
