"""The wire to an upstream model API: one streamed Chat Completions call and its errors.

`ChatStream` is one `POST {base_url}/chat/completions` with `stream: true` on
an `aiohttp.ClientSession` (the sessions themselves, one per upstream
deployment, live in `switchboard.broker.clients`):

    async with client.stream(payload) as chunks:     # HTTP status checked here
        async for chunk in chunks:                    # dicts, until `[DONE]`
            ...
        # or, a list of dicts per read of the body, None after `[DONE]`:
        while (batch := await chunks.read()) is not None:
            ...

The body is read as raw bytes, split into SSE events here (`SseDecoder`) and
their `data:` decoded with orjson straight into dicts: no HTTP library
wrappers, no typed chunk objects. Every failure leaves as a
`switchboard.errors` error whose message never holds the key or an unvetted
upstream body: `status_error` (a non-2xx answer), `request_error` (no answer)
and `read_error` (the body broke off). Leaving the `async with` (normally, by
an error or by cancellation) releases the response; a response that was not
read to the end closes its TCP connection instead of returning it to the pool,
so the upstream sees the client go away at once and stops generating.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from opentelemetry import trace

from switchboard.broker.retry import TransientUpstreamError
from switchboard.broker.translate import text_only
from switchboard.errors import (
    SwitchboardError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from switchboard.telemetry import tracing

DONE = b"[DONE]"
# Where a text-only chunk's text starts, as servers write their chunks (compact JSON).
TEXT_MARK = b'"delta":{"content":"'
# Shapes of text-only chunks checked (each costs a second decode) per stream, at most.
LEARN_TRIES = 4
# The most of an error response's body that is read (for its `message`).
MAX_ERROR_BODY = 64 * 1024
MAX_MESSAGE_CHARS = 300
# Key-shaped strings an upstream may echo back (OpenAI's 401 quotes part of the key).
_KEY_LIKE = re.compile(r"\b(?:sk|rk|ek|pk)[-_][A-Za-z0-9_\-*.]{6,}|\bBearer\s+\S+", re.IGNORECASE)
_REDACTED = "[redacted]"


class SseDecoder:
    """Incremental decoder of a `text/event-stream` body into event data payloads.

    Feed the body in chunks of any size; each call returns the `data` of the
    events completed by it. Multi-line `data:` fields are joined with `\\n`,
    comments (`:`), other fields (`event:`, `id:`, `retry:`) and blank lines
    between events carry nothing for Chat Completions and are skipped. Lines
    may end with LF, CRLF or CR. `close()` returns an event left unterminated
    at the end of the body (some servers omit the final blank line).
    """

    def __init__(self) -> None:
        self._tail = b""
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that this chunk completes, in order."""
        if self._pending_cr or b"\r" in chunk:
            chunk = self._lf_only(chunk)
        if (
            not self._tail
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
        ):
            # The common case, a read that is one whole `data: ` event (a paced
            # token): no buffer to join, split or keep.
            return [chunk[6:-2]] if len(chunk) > 8 else []
        buffer = self._tail + chunk if self._tail else chunk
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._tail = buffer
            return []
        self._tail = buffer[end + 2 :]
        events: list[bytes] = []
        for block in buffer[:end].split(b"\n\n"):
            # The common case, one `data: ` line per event, without a line loop.
            if block.startswith(b"data: ") and b"\n" not in block:
                if len(block) > 6:  # an event with empty data is not dispatched (SSE spec)
                    events.append(block[6:])
            else:
                self._block(block, events)
        return events

    def close(self) -> list[bytes]:
        """The data of an event that the body ended without terminating, if any."""
        events: list[bytes] = []
        tail, self._tail = self._tail, b""
        self._block(tail, events)
        return events

    def _lf_only(self, chunk: bytes) -> bytes:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between two chunks
        self._pending_cr = chunk.endswith(b"\r")
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    @staticmethod
    def _block(block: bytes, events: list[bytes]) -> None:
        """The events of lines with no blank line between them but where one starts."""
        data: list[bytes] = []
        for line in (*block.split(b"\n"), b""):
            if not line:
                if data:
                    joined = b"\n".join(data)
                    data = []
                    if joined:  # an event with empty data is not dispatched (SSE spec)
                        events.append(joined)
            elif line.startswith(b"data"):
                field, _, value = line.partition(b":")
                if field == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)


def upstream_host(base_url: str) -> str:
    """`host` or `host:port` of a base URL (IPv6 in brackets), without credentials."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def sanitize(message: str, secrets: tuple[str, ...] = ()) -> str:
    """An upstream message made safe to show: no keys, one line, at most ~300 chars."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, _REDACTED)
    message = " ".join(_KEY_LIKE.sub(_REDACTED, message).split())
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return message


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(float(raw) * scale, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    try:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
    except (TypeError, ValueError):
        when = None
    if when is None or when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def status_error(
    status: int,
    headers: Mapping[str, str],
    body: object = None,
    secrets: tuple[str, ...] = (),
) -> SwitchboardError:
    """The Switchboard error for an upstream's non-2xx answer to the request.

    Args:
        status: the HTTP status.
        headers: the response headers (`retry-after` and `retry-after-ms` are read).
        body: the decoded JSON error body, when one was read (only its
            `message` is ever shown, see `error_message`).
        secrets: strings to redact from that message (the upstream's key).
    """
    if status == 429:
        retry_after = retry_after_seconds(headers)
        when = "" if retry_after is None else f"; retry after {retry_after:g} s"
        return UpstreamRateLimited(
            f"The upstream is rate limiting requests{when}.", retry_after=retry_after
        )
    if status in (401, 403):
        # OpenAI's 401 message quotes part of the key: never pass it on.
        return UpstreamError("The upstream rejected the configured credentials.")
    if status >= 500 or status in (408, 409):
        # The statuses OpenAI's own SDKs retry: the next attempt may well succeed.
        return TransientUpstreamError(
            f"The upstream failed (HTTP {status}).", reason="server_error"
        )
    detail = error_message(body, secrets)
    suffix = f": {detail}" if detail else "."
    return UpstreamError(f"The upstream refused the request (HTTP {status}){suffix}")


def wants_body(status: int) -> bool:
    """Whether `status_error` shows the body of a response with this status."""
    return not (status in (401, 403, 408, 409, 429) or status >= 500)


def request_error(exc: BaseException) -> SwitchboardError:
    """The Switchboard error for a request that got no response (connect, send, headers)."""
    if caused_by_timeout(exc):
        return UpstreamTimeout("The upstream did not answer in time.")
    return TransientUpstreamError("The upstream is unreachable.", reason="connection")


def read_error(exc: BaseException) -> SwitchboardError:
    """The Switchboard error for a response body that broke off or fell silent."""
    if caused_by_timeout(exc):
        return UpstreamTimeout("The upstream stopped sending before the response was complete.")
    return UpstreamStreamBroken("The upstream stream broke off.")


def error_message(body: object, secrets: tuple[str, ...] = ()) -> str:
    """The sanitized `message` of an OpenAI-style error object, or "" when there is none.

    Only the designated message field is used, never the raw body.
    """
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
        if isinstance(message, str):
            return sanitize(message, secrets)
    return ""


def caused_by_timeout(exc: BaseException) -> bool:
    """Whether a `TimeoutError` is in the exception's cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TimeoutError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class ChatStream:
    """One streamed Chat Completions call; see the module docstring for its use.

    Entering sends the request (once: the broker retries, see
    `switchboard.broker.retry`) and raises the mapped error if it fails;
    iterating yields each chunk as a dict until `[DONE]`; exiting releases the
    response. Enter and iterate it once.

    `opened` is called when entering starts and `closed` exactly once when the
    call is over (the request failed, or the response was released): the
    owner of the session counts calls in flight with them, to close a replaced
    session only once nothing uses it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        payload: dict[str, Any],
        *,
        headers: Mapping[str, str],
        secrets: tuple[str, ...],
        proxy: str | None = None,
        opened: Callable[[], None] = lambda: None,
        closed: Callable[[], None] = lambda: None,
    ) -> None:
        """Args:
        session: the upstream's session (its pool and timeouts).
        url: the full URL of `/chat/completions`.
        payload: the JSON body (`translate.chat_request`).
        headers: the upstream's own headers (its `Authorization`).
        secrets: strings never shown in an error message (the key).
        proxy: the URL of the HTTP proxy to go through, if any.
        opened: called when the request starts.
        closed: called once when the call is over.
        """
        self._session = session
        self._url = url
        self._payload = payload
        self._headers = headers
        self._secrets = secrets
        self._proxy = proxy
        self._opened = opened
        self._closed = closed
        self._response: aiohttp.ClientResponse | None = None
        self.request_id: str | None = None
        self._decoder = SseDecoder()
        # The bytes around the text of the last text-only chunk learnt (`_learn`).
        self._prefix: bytes | None = None
        self._suffix = b""
        self._learn_tries = LEARN_TRIES
        # The read timeout while the body is read (`_bound_silence`): since when
        # `read` waits (None while it does not), and the timer that checks it.
        self._read_timeout = 0.0
        self._waiting_since: float | None = None
        self._silence: asyncio.TimerHandle | None = None
        self._clock: Callable[[], float] = time.monotonic
        # Set once the body ended: cleanly (`[DONE]`), or not (`_broken`).
        self._over = False
        self._broken = False

    async def __aenter__(self) -> ChatStream:
        # Counted before the first await, so the session cannot be closed under
        # a request that is being sent.
        self._opened()
        headers = dict(self._headers)
        # The current span (broker.spans.ChatSpan) goes along: an upstream that
        # reads `traceparent` (vLLM does) continues the trace.
        headers.update(tracing.headers(trace.get_current_span()))
        try:
            response = await self._session.post(
                self._url,
                data=orjson.dumps(self._payload),
                headers=headers,
                proxy=self._proxy,
                # A redirect would resend the key elsewhere: it is an error instead.
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._closed()
            raise request_error(exc) from exc
        except BaseException:
            self._closed()
            raise
        if response.status >= 300:
            try:
                body = await _error_body(response) if wants_body(response.status) else None
            finally:
                response.release()
                self._closed()
            raise status_error(response.status, response.headers, body, self._secrets)
        self._response = response
        self.request_id = response.headers.get("x-request-id")
        self._bound_silence(response)
        return self

    def _bound_silence(self, response: aiohttp.ClientResponse) -> None:
        """Bound the wait for the body with one timer per call instead of aiohttp's.

        aiohttp bounds the silence between two packets (`sock_read`) by
        cancelling and scheduling a timer for every packet it receives. From
        the headers on, the stream does it instead: a timer that fires once
        per read timeout and fails the body (`SocketTimeoutError`, as aiohttp's
        would) when `read` has been waiting that long for bytes. Time the
        broker spends not reading (its follower is full) does not count.
        """
        timeout = self._session.timeout.sock_read
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if not timeout or protocol is None:
            return  # no timeout, or the whole body is in already
        # No timeout: `start_timeout` cancels aiohttp's pending timer and
        # schedules none, nor does each packet; the next request sets it again.
        protocol.read_timeout = None
        protocol.start_timeout()
        self._read_timeout = timeout
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._silence = loop.call_at(loop.time() + timeout, self._check_silence)

    def _check_silence(self) -> None:
        self._silence = None
        response = self._response
        if response is None or self._over:
            return
        loop = asyncio.get_running_loop()
        since, now = self._waiting_since, loop.time()
        if since is not None and now - since >= self._read_timeout:
            response.content.set_exception(
                aiohttp.SocketTimeoutError("Timeout on reading data from socket")
            )
            return
        start = now if since is None else since
        self._silence = loop.call_at(start + self._read_timeout, self._check_silence)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def aclose(self) -> None:
        """Release the response (idempotent); see `close`."""
        self.close()

    def close(self) -> None:
        """Release the response at once (idempotent); safe from synchronous code.

        Read to the end, its connection goes back to the pool; unread, the
        connection is closed, which tells the upstream to stop generating.
        """
        response, self._response = self._response, None
        if response is None:
            return
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        try:
            response.release()
        finally:
            # Only the caller that took the response reports the end: once.
            self._closed()

    def close_soon(self) -> None:
        """`close()`, for callers from synchronous code (a gRPC done callback)."""
        self.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._response is None:
            raise RuntimeError("iterate a ChatStream inside its `async with` block")
        self._learn_tries = 0  # every chunk as its dict
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        while (chunks := await self.read()) is not None:
            for chunk in chunks:
                assert not isinstance(chunk, str)
                yield chunk

    async def read(self) -> list[dict[str, Any] | str] | None:
        """The chunks that the next read of the body completes, in order (often
        one, possibly none); None once the stream ended with `[DONE]`.

        One call per read rather than an iterator step per chunk: the broker's
        hot loop (`dispatch`) pays for a read, not for a layer per chunk.

        A chunk is its decoded JSON, or, when it is a text-only chunk
        (`translate.text_only`) byte for byte like the last one decoded in
        full except for its text, that text as a `str`, without decoding the
        JSON (`ChunkTranslator.feed` takes both). The shape is learnt from a
        decoded chunk (`_learn`) and a text is taken as it is only when it
        holds no quote, no backslash and nothing unprintable; any other chunk
        is decoded in full.

        Raises:
            SwitchboardError: `read_error` when the body broke off or fell
                silent, `UpstreamStreamBroken` when it ended before `[DONE]`
                (after the chunks before the end) or sent a malformed or
                `error` chunk.
        """
        response = self._response
        if response is None:
            raise RuntimeError("read a ChatStream inside its `async with` block")
        if self._over:
            if self._broken:
                raise UpstreamStreamBroken("The upstream stream ended before it was complete.")
            return None
        if self._silence is not None:
            self._waiting_since = self._clock()
        try:
            data = await response.content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise read_error(exc) from exc
        finally:
            self._waiting_since = None
        if data:
            events = self._decoder.feed(data)
        else:
            events = self._decoder.close()
            self._over = self._broken = True
        chunks: list[dict[str, Any] | str] = []
        prefix, suffix = self._prefix, self._suffix
        for event in events:
            if prefix is not None and event.startswith(prefix) and event.endswith(suffix):
                text = _plain_text(event, len(prefix), len(event) - len(suffix))
                if text is not None:
                    chunks.append(text)
                    continue
            if event == DONE:
                self._over, self._broken = True, False
                break
            chunks.append(self._decode(event))
            prefix, suffix = self._prefix, self._suffix  # it may have learnt a shape
        return chunks

    def _decode(self, data: bytes) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            raise UpstreamStreamBroken("The upstream sent a malformed stream chunk.")
        if chunk.get("error") is not None:
            # OpenAI reports a failure after the stream started as an `error` chunk.
            detail = error_message(chunk, self._secrets) or "no details"
            raise UpstreamStreamBroken(f"The upstream failed mid-stream: {detail}")
        if self._learn_tries > 0:
            text = text_only(chunk)
            if text is not None:
                self._learn(data, chunk, text)
        return chunk

    def _learn(self, data: bytes, chunk: dict[str, Any], text: str) -> None:
        """Take the bytes around the text of a text-only chunk as the shape of the next.

        Only when the text sits where `TEXT_MARK` says, once, without escapes,
        and the chunk with other text there decodes to the same chunk with
        that text: then any run of bytes without a quote or a backslash put in
        its place is that chunk with that text.
        """
        start = data.find(TEXT_MARK)
        if start < 0 or data.find(TEXT_MARK, start + 1) >= 0:
            return
        start += len(TEXT_MARK)
        end = data.find(b'"', start)
        if end < 0 or b"\\" in data[start:end] or data[end : end + 2] != b'"}':
            return
        prefix, suffix = data[:start], data[end:]
        if prefix == self._prefix and suffix == self._suffix:
            return  # the shape known: the text alone was not plain
        self._learn_tries -= 1
        probe = "." if text != "." else ","
        try:
            other = orjson.loads(prefix + probe.encode() + suffix)
        except orjson.JSONDecodeError:
            return
        if text_only(other) != probe:
            return
        other["choices"][0]["delta"]["content"] = text
        if other == chunk:
            self._prefix, self._suffix = prefix, suffix


def _plain_text(event: bytes, start: int, end: int) -> str | None:
    """`event[start:end]` as the text of a JSON string that needs no unescaping:
    no quote, no backslash, valid UTF-8 and printable; None otherwise."""
    if end < start:
        return None  # the shape's two ends overlap: not this shape
    raw = event[start:end]
    if b'"' in raw or b"\\" in raw:
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


async def _error_body(response: aiohttp.ClientResponse) -> object:
    """The JSON of an error response's first `MAX_ERROR_BODY` bytes; None if unreadable."""
    raw = bytearray()
    try:
        while len(raw) < MAX_ERROR_BODY:
            part = await response.content.read(MAX_ERROR_BODY - len(raw))
            if not part:
                break
            raw += part
        return orjson.loads(raw)
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError):
        # A body cut short, silent or not JSON says nothing that may be shown.
        return None
