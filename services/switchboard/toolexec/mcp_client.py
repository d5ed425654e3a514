"""toolexec as an MCP client: list and call the tools of a tenant's remote MCP servers.

Each operation opens its own streamable-HTTP session with the official `mcp`
SDK (initialize, then `tools/list` or `tools/call`), so a server that restarts
between calls costs nothing and no state outlives the operation. Every
operation is bounded:

- in time, by one deadline over the whole operation (connecting included);
- in size, by a limit on every HTTP body the server sends (a declared
  `Content-Length` over it is refused before reading; reading stops at it);
- in where it may connect: the host is resolved and refused when any of its
  addresses is not public (the webhook rule of `addresses.AddressGuard`,
  `allow_private_hosts` included), and the connection goes to exactly the
  addresses checked. Redirects to another origin are never followed (the SDK's
  rule), proxies in the environment are ignored, and no cookies are kept.

Failures raise `McpFailure` with a message fit for the model and the client:
it names the server's label, never its URL or the headers sent to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore2
import httpx2
import mcp_types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from switchboard.tenancy import McpServer
from switchboard.toolexec.addresses import AddressGuard, DestinationRefused

E = TypeVar("E", bound=BaseException)

# httpx2 logs each request's URL at INFO, and the SDK's warnings quote exception
# texts that hold URLs: an MCP server's URL is tenant configuration (it may carry
# a token) and is never logged.
for _noisy in ("httpx2", "httpcore2", "mcp"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

USER_AGENT = "switchboard-toolexec"
# The longest piece of a server's error text passed on to the model.
MAX_ERROR_CHARS = 300


class McpFailure(Exception):
    """An MCP operation failed; `message` is safe for the model, the client and logs.

    Attributes:
        timed_out: the operation ran out of time (`tool_timeout`, not `tool_execution_failed`).
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timed_out = timed_out


@dataclass(frozen=True, slots=True)
class McpToolInfo:
    """One tool an MCP server lists."""

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None


@dataclass(slots=True)
class _Watch:
    """What went wrong below the SDK during one operation (which the SDK may hide)."""

    too_large: bool = False
    refused: str | None = None
    http_status: int | None = None


class McpClient:
    """Talks to MCP servers on behalf of tenants.

    Args:
        guard: the private-address rule (shared with the webhook client, so one
            `allow_private_hosts` applies to both).
        environ: where the servers' `headers_env` variables are read.
    """

    def __init__(self, guard: AddressGuard, environ: Mapping[str, str]) -> None:
        self.guard = guard
        self._environ = environ

    async def list_tools(self, server: McpServer) -> list[McpToolInfo]:
        """Every tool the server lists (all pages), within `list_timeout_s`.

        Raises:
            McpFailure: the server could not be reached, took too long, answered
                too much or not MCP.
        """

        async def work(session: ClientSession) -> list[McpToolInfo]:
            tools: list[McpToolInfo] = []
            cursor: str | None = None
            for _ in range(100):  # a server that pages forever is cut off
                params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
                result = await session.list_tools(params=params)
                tools.extend(_tool_info(tool) for tool in result.tools)
                cursor = result.next_cursor
                if not cursor:
                    break
            return tools

        tools: list[McpToolInfo] = await self._run(
            server, server.list_timeout_s, "list its tools", work
        )
        return tools

    async def call_tool(self, server: McpServer, name: str, arguments: dict[str, Any]) -> Any:
        """Call `name` with `arguments`; returns the result for the model: the
        structured content when the server gives one, else the text of its parts.

        Raises:
            McpFailure: the call failed (the tool's own error text is passed on),
                or the server could not be reached, took longer than
                `timeout_s`, or answered too much.
        """

        async def work(session: ClientSession) -> Any:
            try:
                result = await session.call_tool(name, arguments)
            except MCPError as exc:
                raise McpFailure(
                    f"The MCP server {server.label!r} refused the call: "
                    f"{_cut(exc.error.message)} (JSON-RPC error {exc.error.code})."
                ) from None
            text = "\n".join(_part_text(part) for part in result.content)
            if result.is_error:
                raise McpFailure(
                    f"The tool {name!r} of MCP server {server.label!r} failed: {_cut(text)}"
                )
            if result.structured_content is not None:
                return result.structured_content
            return text

        # toolexec's own deadline on the call is `timeout_s` (service.py); this
        # one is a backstop, a second later.
        return await self._run(server, server.timeout_s + 1.0, f"run {name!r}", work)

    async def _run(self, server: McpServer, timeout_s: float, what: str, work: Any) -> Any:
        watch = _Watch()
        try:
            secrets = server.headers(self._environ)
        except Exception:
            # The variable went missing since the file was checked (cannot happen
            # with a fixed environment; kept specific all the same).
            raise McpFailure(f"The MCP server {server.label!r} is misconfigured.") from None
        transport = _Transport(self.guard, watch, server.max_response_bytes)
        client = httpx2.AsyncClient(
            transport=transport,
            headers={
                **{name: value.reveal() for name, value in secrets.items()},
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
            },
            timeout=httpx2.Timeout(timeout_s),
            trust_env=False,
            follow_redirects=False,
        )
        try:
            async with (
                asyncio.timeout(timeout_s),
                client,
                streamable_http_client(server.url, http_client=client) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await work(session)
        except McpFailure:
            raise
        except TimeoutError:
            if watch.refused is None and not watch.too_large:
                raise McpFailure(
                    f"The MCP server {server.label!r} did not {what} within {timeout_s:g} s.",
                    timed_out=True,
                ) from None
            raise _failure(server, watch, None) from None
        except Exception as exc:  # the SDK wraps errors in exception groups
            raise _find(exc, McpFailure) or _failure(server, watch, exc) from None


def _failure(server: McpServer, watch: _Watch, exc: BaseException | None) -> McpFailure:
    label = server.label
    if watch.refused is not None:
        return McpFailure(f"The MCP server {label!r} was not called: {watch.refused}.")
    if watch.too_large:
        return McpFailure(
            f"The MCP server {label!r} sent a response larger than "
            f"{server.max_response_bytes} bytes."
        )
    if watch.http_status is not None:
        return McpFailure(f"The MCP server {label!r} answered HTTP {watch.http_status}.")
    refusal = _find(exc, MCPError)
    if refusal is not None:
        return McpFailure(
            f"The MCP server {label!r} answered an error: {_cut(refusal.error.message)} "
            f"(JSON-RPC error {refusal.error.code})."
        )
    root = _find(exc, OSError) or _find(exc, httpx2.TransportError) or exc
    kind = type(root).__name__ if root is not None else "no answer"
    return McpFailure(
        f"The MCP server {label!r} could not be reached or broke off the call ({kind})."
    )


def _find(exc: BaseException | None, kind: type[E]) -> E | None:
    """The first `kind` error behind an SDK error, searching its causes and groups."""
    seen = 0
    stack: list[BaseException] = [exc] if exc is not None else []
    while stack and seen < 64:
        error = stack.pop(0)
        seen += 1
        if isinstance(error, kind):
            return error
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)
        for linked in (error.__cause__, error.__context__):
            if linked is not None:
                stack.append(linked)
    return None


def _tool_info(tool: mcp_types.Tool) -> McpToolInfo:
    annotations = tool.annotations.model_dump(exclude_none=True) if tool.annotations else None
    return McpToolInfo(
        name=tool.name,
        description=tool.description or "",
        input_schema=dict(tool.input_schema),
        annotations=annotations or None,
    )


def _part_text(part: Any) -> str:
    text = getattr(part, "text", None)
    if isinstance(text, str):
        return text
    kind = getattr(part, "type", "content")
    mime = getattr(part, "mime_type", None)
    return f"[{kind}{' ' + mime if mime else ''} omitted]"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


class _GuardedBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to addresses the guard allows, and to exactly those it checked."""

    def __init__(self, guard: AddressGuard, watch: _Watch) -> None:
        self._guard = guard
        self._watch = watch
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            addresses = await self._vetted(host, port)
        except DestinationRefused as exc:
            self._watch.refused = str(exc).replace("webhook destination", "destination")
            raise
        last: OSError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore2.ConnectError as exc:
                last = OSError(str(exc))
        raise httpcore2.ConnectError(str(last) if last else "no address to connect to")

    async def _vetted(self, host: str, port: int) -> list[str]:
        self._guard.check_literal(host)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._guard.check_resolved(host, addresses)
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not MCP servers")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Transport(httpx2.AsyncHTTPTransport):
    """httpx2's transport over `_GuardedBackend`, with every response body bounded."""

    def __init__(self, guard: AddressGuard, watch: _Watch, max_bytes: int) -> None:
        super().__init__(trust_env=False)
        # The pool httpx2 built, rebuilt with the guarded network backend (httpx2
        # has no public way to pass one).
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            network_backend=_GuardedBackend(guard, watch),
        )
        self._watch = watch
        self._max_bytes = max_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if response.status_code >= 400:
            # The SDK turns most statuses into a generic JSON-RPC error: keep the real one.
            self._watch.http_status = response.status_code
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            await response.aclose()
            self._watch.too_large = True
            raise httpx2.RemoteProtocolError("response too large", request=request)
        if response.headers.get("content-encoding", "identity") != "identity":
            # Asked for identity: a compressed body would escape the size limit.
            await response.aclose()
            raise httpx2.RemoteProtocolError("compressed response refused", request=request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_BoundedStream(response.stream, self._max_bytes, self._watch),
            extensions=response.extensions,
            request=request,
        )


class _BoundedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, max_bytes: int, watch: _Watch) -> None:
        self._inner = inner
        self._left = max_bytes
        self._watch = watch

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._left -= len(chunk)
            if self._left < 0:
                self._watch.too_large = True
                raise httpx2.RemoteProtocolError("response too large")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()
