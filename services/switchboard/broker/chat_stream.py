"""The wire to an upstream model API: one streamed Chat Completions call and its errors.

`ChatStream` is one call through an `openai.AsyncOpenAI` client (the clients
themselves, one per upstream deployment, live in `switchboard.broker.clients`):

    async with client.stream(payload) as chunks:     # HTTP status checked here
        async for chunk in chunks:                    # dicts, until `[DONE]`
            ...

The body is read as raw bytes and its SSE `data:` lines decoded with orjson,
which costs far less per token than the SDK's typed chunk objects. Every
failure leaves as a `switchboard.errors` error whose message never holds the
key or an unvetted upstream body. Leaving the `async with` (normally, by an
error or by cancellation) closes the response; a response that was not read to
the end closes its TCP connection instead of returning it to the pool, so the
upstream sees the client go away at once and stops generating.
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

import openai
import orjson
from opentelemetry import trace

from switchboard.broker.retry import TransientUpstreamError
from switchboard.errors import (
    SwitchboardError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from switchboard.telemetry import tracing

DONE = b"[DONE]"
# The SDK's own retries are off: the broker retries and fails over itself
# (switchboard.broker.retry), across deployments and until the first token.
MAX_RETRIES = 0
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
        self._data: list[bytes] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that this chunk completes, in order."""
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between two chunks
        self._pending_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[bytes]:
        """The data of an event that the body ended without terminating, if any."""
        events: list[bytes] = []
        if self._tail:
            self._line(self._tail, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            data = b"\n".join(self._data)
            self._data = []
            if data:  # an event with empty data is not dispatched (SSE spec)
                events.append(data)
        elif line.startswith(b"data"):
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)


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


def api_error(exc: openai.APIError, secrets: tuple[str, ...] = ()) -> SwitchboardError:
    """The Switchboard error for a failure the SDK raised before the stream began."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            retry_after = retry_after_seconds(exc.response.headers)
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
        detail = error_message(exc.body, secrets)
        suffix = f": {detail}" if detail else "."
        return UpstreamError(f"The upstream refused the request (HTTP {status}){suffix}")
    # The aiohttp transport reports a refused connection as a connect *timeout*;
    # only a real timeout somewhere in the chain makes this one.
    if isinstance(exc, openai.APITimeoutError) and caused_by_timeout(exc):
        return UpstreamTimeout("The upstream did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        return TransientUpstreamError("The upstream is unreachable.", reason="connection")
    return UpstreamError("The upstream call failed.")


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

    Entering sends the request (once: the SDK does not retry) and raises the
    mapped error if it fails; iterating yields each chunk as a dict until `[DONE]`;
    exiting closes the response. Enter and iterate it once.

    `opened` is called when entering starts and `closed` exactly once when the
    call is over (the request failed, or the response was closed): the owner of
    the client counts calls in flight with them, to close a replaced client
    only once nothing uses it.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        payload: dict[str, Any],
        *,
        secrets: tuple[str, ...],
        background: set[asyncio.Task[None]],
        opened: Callable[[], None] = lambda: None,
        closed: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._payload = payload
        self._secrets = secrets
        self._background = background
        self._opened = opened
        self._closed = closed
        self._response: openai.AsyncAPIResponse[Any] | None = None
        self.request_id: str | None = None

    async def __aenter__(self) -> ChatStream:
        # Counted before the first await, so the client cannot be closed under
        # a request that is being sent.
        self._opened()
        # The current span (broker.spans.ChatSpan) goes along: an upstream that
        # reads `traceparent` (vLLM does) continues the trace.
        headers = tracing.headers(trace.get_current_span())
        manager = self._client.chat.completions.with_streaming_response.create(
            **self._payload, extra_headers=headers
        )
        try:
            self._response = await manager.__aenter__()
        except openai.APIError as exc:
            self._closed()
            raise api_error(exc, self._secrets) from exc
        except BaseException:
            self._closed()
            raise
        self.request_id = self._response.request_id
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the response (idempotent). Unread, its connection is closed, not pooled."""
        response, self._response = self._response, None
        if response is None:
            return
        try:
            await response.close()
        finally:
            # Only the caller that took the response reports the end: once.
            self._closed()

    def close_soon(self) -> None:
        """Schedule `aclose()` from synchronous code, e.g. a gRPC done callback."""
        if self._response is None:
            return
        task = asyncio.get_running_loop().create_task(self.aclose())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._response is None:
            raise RuntimeError("iterate a ChatStream inside its `async with` block")
        return self._chunks(self._response)

    async def _chunks(
        self, response: openai.AsyncAPIResponse[Any]
    ) -> AsyncIterator[dict[str, Any]]:
        decoder = SseDecoder()
        body = response.iter_bytes()
        try:
            while True:
                try:
                    data = await anext(body)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    # Transport errors are the SDK transport's own types (the SDK
                    # wraps only errors before the response), so classify by cause.
                    raise _read_error(exc) from exc
                for event in decoder.feed(data):
                    if event == DONE:
                        return
                    yield self._decode(event)
            for event in decoder.close():
                if event == DONE:
                    return
                yield self._decode(event)
        finally:
            aclose: Callable[[], Any] | None = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        raise UpstreamStreamBroken("The upstream stream ended before it was complete.")

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
        return chunk


def _read_error(exc: Exception) -> SwitchboardError:
    if caused_by_timeout(exc):
        return UpstreamTimeout("The upstream stopped sending before the response was complete.")
    return UpstreamStreamBroken("The upstream stream broke off.")
