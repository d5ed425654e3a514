"""`RealtimeClient`: a Switchboard Realtime connection that resumes by itself.

The asyncio driver around `EventTracker` (tracker.py): it opens the WebSocket,
feeds every frame to the tracker, and when the connection is lost (a dropped
socket, a drain's 1012, a resumable close code, a killed gateway) reconnects
with full-jitter backoff to the next URL and resumes the session with
`?session_id=...&last_event_id=...`. It stops only on a terminal refusal,
raising a typed error from `events()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from switchboard_client.backoff import Backoff
from switchboard_client.errors import (
    INVALID_API_KEY_CLOSE,
    AuthenticationError,
    ClientClosed,
    GaveUp,
    SwitchboardClientError,
    close_is_terminal,
    status_is_terminal,
    terminal_close,
    terminal_status,
)
from switchboard_client.events import (
    JSON,
    ClientSecret,
    ConnectionState,
    Response,
    ServerEvent,
    StateChange,
)
from switchboard_client.tracker import EventTracker

log = logging.getLogger("switchboard_client")

# Credentials as they would appear in a log line: a bearer token, a key, a secret.
_CREDENTIAL = re.compile(r"(Bearer\s+)\S+|\b(?:sk-|ek_)[A-Za-z0-9_-]+")


class _Redact(logging.Filter):
    """Blanks credentials out of log records (websockets logs a handshake's
    headers, `Authorization` included, at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact(text: str) -> str:
    return _CREDENTIAL.sub(lambda m: f"{m.group(1) or ''}<redacted>", text)


# The WebSocket library's own log, through the filter.
_ws_log = logging.getLogger("switchboard_client.websockets")
_ws_log.addFilter(_Redact())

TokenProvider = Callable[[], Awaitable["str | ClientSecret"]]
ToolHandler = Callable[..., Awaitable[Any]]
StateCallback = Callable[[StateChange], None]

# A provider's secret is asked for again this long before it expires.
_EXPIRY_MARGIN_S = 5.0


@dataclass(frozen=True)
class Tool:
    """A client-side tool: the model calls it, the client runs `handler` and
    answers with its result (JSON-encoded unless it is a string).

    `handler` is a plain async function; it gets the call's arguments as
    keyword arguments.
    """

    name: str
    handler: ToolHandler
    description: str = ""
    parameters: JSON = field(default_factory=lambda: {"type": "object", "properties": {}})

    def definition(self) -> JSON:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }


class RequestFailed(SwitchboardClientError):
    """The server answered a client event of `stream_text` with an `error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _Retry(Exception):
    """A connection attempt failed in a way worth retrying."""

    def __init__(self, reason: str, after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_s = after_s


class RealtimeClient:
    """A Realtime connection to Switchboard that resumes by itself.

    Use it as an async context manager (or call `connect` and `close`). Read
    the server's events with `events()` (or one response's text with
    `stream_text`); each is delivered exactly once, in order, whatever
    reconnects happened in between.

    Args:
        url: the gateway's WebSocket URL (`ws://host:8080/v1/realtime`), or
            several (replicas): each reconnect tries the next one.
        model: the session's model.
        api_key: a tenant key or an `ek_` secret.
        token_provider: instead of `api_key`, an async function returning an
            `ek_` secret (a `str`, or a `ClientSecret` with its expiry); called
            again before the secret expires and when the server refuses it.
        tools: client-side tools, declared with `session.update` when the
            session starts; their calls are run and answered by the client.
        instructions: the session's instructions (sent with the tools).
        backoff: the reconnect policy (`Backoff()` by default).
        on_state: called on each connection state change.
        ping_interval_s, ping_timeout_s: the client's heartbeat: a connection
            whose pong does not come in time counts as lost (a network cut).
        open_timeout_s: the handshake's time limit.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        model: str = "gpt-realtime",
        api_key: str | None = None,
        token_provider: TokenProvider | None = None,
        tools: Sequence[Tool] = (),
        instructions: str | None = None,
        backoff: Backoff | None = None,
        on_state: StateCallback | None = None,
        ping_interval_s: float | None = 10.0,
        ping_timeout_s: float | None = 10.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        if (api_key is None) == (token_provider is None):
            raise ValueError("give exactly one of api_key and token_provider")
        self._urls = [url] if isinstance(url, str) else list(url)
        if not self._urls:
            raise ValueError("give at least one url")
        self.model = model
        self._provider = token_provider
        self._credential = ClientSecret(api_key) if api_key is not None else None
        self._tools = {tool.name: tool for tool in tools}
        self._instructions = instructions
        self.backoff = backoff or Backoff()
        self._on_state = on_state
        self._ping = (ping_interval_s, ping_timeout_s)
        self._open_timeout_s = open_timeout_s
        self.tracker = EventTracker()
        self.state = ConnectionState.CLOSED
        # How many connections were opened, and how many of them resumed the session.
        self.connections = 0
        self.resumes = 0
        prefix = secrets.token_hex(4)
        self._event_ids = (f"sbc_{prefix}_{n}" for n in itertools.count(1))
        self._item_ids = (f"item_sbc{prefix}{n}" for n in itertools.count(1))
        self._queue: asyncio.Queue[ServerEvent | BaseException] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._generation = 0
        # Client events already sent on the current connection, by event id.
        self._sent_now: set[str] = set()
        self._runner: asyncio.Task[None] | None = None
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._url_index = 0
        # Why the client stopped by itself (what `events()` raises).
        self.error: Exception | None = None
        # The URL of the current (or last) connection: which replica serves it.
        self.url: str | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> RealtimeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session_id(self) -> str | None:
        return self.tracker.session_id

    async def connect(self) -> None:
        """Open the first connection (retrying as the backoff allows).

        Raises:
            TerminalError: the server refused (bad key, model not allowed, ...).
            GaveUp: no attempt succeeded.
        """
        if self._runner is not None:
            raise RuntimeError("connect() was called already")
        self._runner = asyncio.create_task(self._run())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait((ready, self._runner), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise self.error or ClientClosed("the client was closed")
        if self._tools or self._instructions is not None:
            await self.send(self._session_update())

    async def close(self) -> None:
        """Close the connection; `events()` ends. Idempotent."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout=2.0)
        for task in [self._runner, *self._tool_tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._ready.clear()
        if self.state is not ConnectionState.CLOSED:
            self._set_state(StateChange(ConnectionState.CLOSED, reason="closed"))
        self._queue.put_nowait(ClientClosed("the client was closed"))

    def drop_connection(self) -> None:
        """Cut the socket as a lost network would (no close frame): for tests and
        demos of resuming. The client reconnects and resumes as after any loss."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # --- sending ------------------------------------------------------------------------

    async def send(self, event: JSON) -> str:
        """Send a client event (an `event_id` is added when it has none); waits
        while the client reconnects. An event the server may not have got
        because the connection was lost is sent again after the resume (see the
        README: what happens to events sent at the instant of a cut).

        Returns:
            The event's `event_id`.
        """
        event = {**event}
        event.setdefault("event_id", next(self._event_ids))
        event_id = str(event["event_id"])
        self.tracker.sent(event)
        await self._wait_ready()
        if event_id in self._sent_now:  # the resume's resend sent it already
            return event_id
        self._sent_now.add(event_id)
        ws = self._ws
        if ws is not None:
            # Lost with the connection: sent again after the resume if unanswered.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps(event))
        return event_id

    async def add_text(self, text: str, *, role: str = "user") -> str:
        """Add a message to the conversation; returns its item id (chosen by the
        client, so a resend after a cut is recognised)."""
        item_id = next(self._item_ids)
        content_type = "output_text" if role == "assistant" else "input_text"
        await self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "id": item_id,
                    "type": "message",
                    "role": role,
                    "content": [{"type": content_type, "text": text}],
                },
            }
        )
        return item_id

    async def create_response(self, **overrides: Any) -> str:
        """Ask for a response (`response.create`, with optional `response`
        fields such as `instructions`); returns the client event id."""
        event: JSON = {"type": "response.create"}
        if overrides:
            event["response"] = overrides
        return await self.send(event)

    async def send_tool_output(self, call_id: str, output: str) -> str:
        """Answer a function call (without asking for the next response)."""
        return await self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "id": next(self._item_ids),
                    "type": "function_call_output",
                    "call_id": call_id,
                    "output": output,
                },
            }
        )

    async def cancel(self) -> str:
        """Cancel the running response (`response.cancel`)."""
        return await self.send({"type": "response.cancel"})

    # --- receiving ----------------------------------------------------------------------

    async def events(self) -> AsyncIterator[ServerEvent]:
        """Every server event, exactly once and in order, across reconnects.
        Ends when the client is closed.

        Raises:
            TerminalError: the server ended the session for good.
            GaveUp: reconnecting failed `backoff.max_attempts` times in a row.
        """
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._queue.put_nowait(item)  # for every later reader too
                if isinstance(item, ClientClosed):
                    return
                raise item
            yield item

    def stream_text(self, text: str | None = None, **response: Any) -> TextStream:
        """Send `text` (if given), ask for a response, and iterate its text; see
        `TextStream`. Only one reader of `events()` at a time."""
        return TextStream(self, text, response)

    # --- the connection loop ------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        close_code: int | None = None
        reason = ""
        suggested: float | None = None
        try:
            while True:
                resuming = self.tracker.session_id is not None
                if failures or resuming:
                    if self.backoff.exhausted(failures):
                        raise GaveUp(
                            f"no connection after {failures} attempts ({reason})",
                            attempts=failures,
                        )
                    delay = self.backoff.delay(failures, suggested)
                    state = ConnectionState.RESUMING if resuming else ConnectionState.CONNECTING
                    self._set_state(
                        StateChange(state, failures + 1, delay, close_code, reason or "dropped")
                    )
                    await asyncio.sleep(delay)
                else:
                    self._set_state(StateChange(ConnectionState.CONNECTING, 1))
                url = self._urls[self._url_index % len(self._urls)]
                try:
                    ws = await self._open(url, resuming)
                except _Retry as retry:
                    failures += 1
                    reason, suggested, close_code = retry.reason, retry.after_s, None
                    self._url_index += 1
                    log.info("connection attempt failed", extra={"reason": reason, "url": url})
                    continue
                failures, suggested = 0, None
                self.url = url
                close_code, reason = await self._serve(ws, resuming)
                self.tracker.connection_lost()
                log.info("connection lost", extra={"close_code": close_code, "reason": reason})
                if close_is_terminal(close_code):
                    if close_code == INVALID_API_KEY_CLOSE and self._provider is not None:
                        self._credential = None  # ask the provider again
                        continue
                    assert close_code is not None
                    raise terminal_close(close_code, reason)
                # Another replica: this one may be draining or dead.
                self._url_index += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            self._set_state(StateChange(ConnectionState.CLOSED, reason="gave up", error=exc))
            self._queue.put_nowait(exc)

    async def _open(self, url: str, resuming: bool) -> ClientConnection:
        query: dict[str, str] = {"model": self.model}
        if resuming:
            assert self.tracker.session_id is not None
            query["session_id"] = self.tracker.session_id
            if self.tracker.last_event_id:
                query["last_event_id"] = self.tracker.last_event_id
        for refresh in (False, True):
            credential = await self._credential_value()
            try:
                return await connect(
                    f"{url}?{urlencode(query)}",
                    additional_headers={"Authorization": f"Bearer {credential}"},
                    max_size=None,
                    ping_interval=self._ping[0],
                    ping_timeout=self._ping[1],
                    open_timeout=self._open_timeout_s,
                    user_agent_header="switchboard-client-python",
                    logger=_ws_log,
                )
            except InvalidStatus as exc:
                status = exc.response.status_code
                code, message = _refusal(exc.response.body)
                if status == 401 and self._provider is not None and not refresh:
                    self._credential = None  # refused: the provider gives a fresh one
                    continue
                if status_is_terminal(status):
                    raise terminal_status(status, code, message) from None
                raise _Retry(code or f"http_{status}", _retry_after(exc)) from None
            except InvalidURI:
                raise
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                raise _Retry(type(exc).__name__) from None
        raise AuthenticationError("refused twice", code="invalid_api_key", status=401)

    async def _credential_value(self) -> str:
        secret = self._credential
        expired = (
            secret is not None
            and secret.expires_at is not None
            and secret.expires_at - _EXPIRY_MARGIN_S <= time.time()
        )
        if secret is None or (expired and self._provider is not None):
            assert self._provider is not None
            given = await self._provider()
            secret = given if isinstance(given, ClientSecret) else ClientSecret(given)
            self._credential = secret
            log.info("credential from the token provider", extra={"expires_at": secret.expires_at})
        return secret.value

    async def _serve(self, ws: ClientConnection, resuming: bool) -> tuple[int | None, str]:
        """Read one connection until it ends; returns its close code and reason."""
        self._ws = ws
        self._generation += 1
        self._sent_now = set()
        self.connections += 1
        self.resumes += resuming
        # A new session is ready with its `session.created`; a resumed one at
        # once, or when the answer to a sync shows the replay is over.
        waiting = True
        if resuming and self.tracker.unanswered():
            await self._transmit(ws, self.tracker.sync_event())
        elif resuming:
            waiting = False
            self._connected(resuming)
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    continue
                raw = json.loads(frame)
                event = self.tracker.accept(raw) if isinstance(raw, dict) else None
                if waiting and (
                    (resuming and self.tracker.synced)
                    or (not resuming and event is not None and event.type == "session.created")
                ):
                    waiting = False
                    # What the server has not answered never reached it: send it again.
                    for pending in self.tracker.unanswered():
                        self._sent_now.add(str(pending["event_id"]))
                        await self._transmit(ws, pending)
                    self._connected(resuming)
                if event is not None:
                    self._deliver(event)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._ready.clear()
        rcvd = ws.close_code
        if ws.protocol.close_rcvd is None:
            return None, "dropped"
        return rcvd, ws.close_reason or ""

    async def _transmit(self, ws: ClientConnection, event: JSON) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(event))

    def _connected(self, resumed: bool) -> None:
        self._ready.set()
        self._set_state(
            StateChange(ConnectionState.CONNECTED, reason="resumed" if resumed else "new")
        )

    def _session_update(self) -> JSON:
        session: JSON = {"type": "realtime"}
        if self._tools:
            session["tools"] = [tool.definition() for tool in self._tools.values()]
        if self._instructions is not None:
            session["instructions"] = self._instructions
        return {"type": "session.update", "session": session}

    async def _wait_ready(self) -> None:
        if self._closing:
            raise ClientClosed("the client was closed")
        if self._ready.is_set():
            return
        if self._runner is None:
            raise RuntimeError("connect() first")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait((ready, self._runner), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise ClientClosed("the client stopped; see events() for why")

    def _deliver(self, event: ServerEvent) -> None:
        self._queue.put_nowait(event)
        response = event.response
        if response is None or response.status != "completed":
            return
        calls = [call for call in response.tool_calls if call.name in self._tools]
        if calls:
            task = asyncio.create_task(self._run_tools(calls))
            self._tool_tasks.add(task)
            task.add_done_callback(self._tool_tasks.discard)

    async def _run_tools(self, calls: Sequence[Any]) -> None:
        for call in calls:
            try:
                result = await self._tools[call.name].handler(**call.parsed_arguments())
                output = result if isinstance(result, str) else json.dumps(result)
            except Exception as exc:
                log.warning("client tool failed", extra={"tool": call.name})
                output = json.dumps({"error": {"code": "tool_failed", "message": str(exc)}})
            await self.send_tool_output(call.call_id, output)
        await self.create_response()

    def _set_state(self, change: StateChange) -> None:
        self.state = change.state
        log.info(
            "connection %s",
            change.state.value,
            extra={"attempt": change.attempt, "delay_s": round(change.delay_s, 3)},
        )
        if self._on_state is not None:
            self._on_state(change)


def _refusal(body: bytes | bytearray | None) -> tuple[str, str]:
    """The error code and message of a refused handshake's OpenAI-style body."""
    try:
        error = json.loads(bytes(body or b"{}")).get("error") or {}
        return str(error.get("code") or ""), str(error.get("message") or "")[:300]
    except (ValueError, AttributeError):
        return "", ""


def _retry_after(exc: InvalidStatus) -> float | None:
    value = exc.response.headers.get("Retry-After")
    try:
        return float(value) if value else None
    except ValueError:
        return None


class TextStream:
    """The text of one response, as it streams: `async for delta in stream`.

    It follows the response through tool rounds (client tools, answered by the
    client, and server tools, answered by the gateway) until a response ends
    without calling a tool. Afterwards `response` is the last response and
    `responses` all of them, each marked `resumed` or `interrupted`.
    """

    def __init__(self, client: RealtimeClient, text: str | None, response: JSON) -> None:
        self._client = client
        self._text = text
        self._overrides = response
        self.responses: list[Response] = []

    @property
    def response(self) -> Response:
        if not self.responses:
            raise RuntimeError("the response has not ended yet")
        return self.responses[-1]

    @property
    def text(self) -> str:
        """The text of every response of the stream so far."""
        return "".join(response.text for response in self.responses)

    async def __aiter__(self) -> AsyncIterator[str]:
        client = self._client
        if self._text is not None:
            await client.add_text(self._text)
        request_id = await client.create_response(**self._overrides)
        async for event in client.events():
            if event.type == "response.output_text.delta":
                yield event.delta
            elif event.type == "response.done" and event.response is not None:
                self.responses.append(event.response)
                if not (event.response.status == "completed" and event.response.tool_calls):
                    return
            elif event.type == "error":
                error = event.data.get("error") or {}
                if error.get("event_id") == request_id or event.error_code == (
                    "tool_rounds_exceeded"
                ):
                    raise RequestFailed(str(error.get("code")), str(error.get("message")))
