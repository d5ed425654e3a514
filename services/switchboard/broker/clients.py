"""The broker's clients of its upstream deployments: one `aiohttp.ClientSession` each.

An upstream is a named deployment of the tenants file (`switchboard.tenancy.Upstream`:
a base URL and a key). `UpstreamClients` builds the client of an upstream the first
time a call is routed to it and shares it between all the calls that follow,
so their connections are kept alive and reused.

A client's session has a connection pool as large as the upstream's admission
limit (`max_concurrent`: admission control, not the pool, decides who waits),
the broker's connect timeout, its read timeout as the longest silence between
two reads, and TCP keepalive on its sockets.

When a reload of the tenants file changes an upstream's base URL, key or
admission limit, or removes the upstream, its client is *retired*: the next
call builds a fresh one, calls already streaming finish on the old one, and
the old one is closed as soon as its last call is over. `aclose()` closes
everything at shutdown.

Call order: build `UpstreamClients(settings)` at start, `tenants.subscribe(clients.reconcile)`,
`client(upstream)` per call (on the event loop), `await aclose()` after the
gRPC server has drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractCookieJar

from switchboard.broker.chat_stream import ChatStream, upstream_host
from switchboard.config import BrokerSettings
from switchboard.tenancy import TenantDirectory, Upstream

log = logging.getLogger(__name__)

USER_AGENT = "switchboard-broker"
# Idle pooled connections are dropped after this long (aiohttp's default).
POOL_IDLE_S = 15.0
# TCP keepalive: probe a connection silent this long (a reply may take
# minutes to start), every KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES times.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3


def upstream_description(upstream: Upstream) -> str:
    """`name (host:port)`: what `Started.upstream` reports; never a key or a path."""
    return f"{upstream.name} ({upstream_host(upstream.base_url)})"


def pool_limit(upstream: Upstream, settings: BrokerSettings) -> int:
    """The connections `upstream`'s pool may hold at once: its admission slots."""
    own = upstream.admission.max_concurrent
    return own if own is not None else settings.max_concurrent


def keepalive_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A socket for an upstream connection, with TCP keepalive on.

    A connection waiting on a slow upstream is silent for long stretches;
    keepalive notices a peer (or a NAT entry) that went away without a FIN.
    """
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all three; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


def new_session(upstream: Upstream, settings: BrokerSettings) -> aiohttp.ClientSession:
    """The session of one upstream: pool, timeouts, keepalive, no cookies."""
    connector = aiohttp.TCPConnector(
        limit=pool_limit(upstream, settings),
        keepalive_timeout=POOL_IDLE_S,
        socket_factory=keepalive_socket,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.connect_timeout_s,
        # `sock_read` bounds the silence between two reads (the wait for the
        # headers included), not the whole stream.
        sock_read=settings.read_timeout_s,
    )
    jar: AbstractCookieJar = aiohttp.DummyCookieJar()
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=jar,
        headers={
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        },
        raise_for_status=False,
        # Not `trust_env`: it looks up netrc and the proxy in a thread on every
        # request (a thread hop and GIL traffic per call); `env_proxy` does it once.
        trust_env=False,
    )


def env_proxy(base_url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy `HTTPS_PROXY` / `HTTP_PROXY` name for `base_url`; None if none or `NO_PROXY`.

    Read when the client is built, as the `openai` SDK's client read them, for
    pods whose egress goes through a proxy.
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    for name in ("no_proxy", "NO_PROXY"):
        for entry in env.get(name, "").replace(",", " ").split():
            entry = entry.lstrip(".").split(":")[0]
            if entry == "*" or host == entry or host.endswith("." + entry):
                return None
    scheme = parts.scheme.lower()
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
        if env.get(name):
            return env[name]
    return None


class UpstreamClient:
    """The session of one upstream deployment, shared by every call routed to it.

    Attributes:
        upstream: the configuration it was built from (its key is a `Secret`).
        description: `name (host:port)`, safe to log and report.
        pool_limit: the most connections its pool holds at once.
        proxy: the HTTP proxy its requests go through (`env_proxy`), if any.
        active: calls in flight (entered and not yet closed).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: Upstream,
        *,
        pool_limit: int,
        on_idle: Callable[[UpstreamClient], None] = lambda _client: None,
    ) -> None:
        """Args:
        session: the upstream's session; this object closes it in `aclose()`.
        upstream: where it points and with which key (the key is redacted
            from any upstream message that is passed on).
        pool_limit: the connection limit `session` was built with.
        on_idle: called each time the last call in flight ends.
        """
        self._session = session
        self.upstream = upstream
        self.description = upstream_description(upstream)
        self.pool_limit = pool_limit
        self.active = 0
        self._on_idle = on_idle
        self._url = upstream.base_url.rstrip("/") + "/chat/completions"
        key = upstream.api_key.reveal()
        self._secrets = (key,) if key else ()
        # Local servers (vLLM, Ollama, the simulator) need no key; a real API
        # answers a request without one with a clear 401.
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.proxy = env_proxy(upstream.base_url)

    @classmethod
    def build(
        cls,
        upstream: Upstream,
        settings: BrokerSettings,
        *,
        on_idle: Callable[[UpstreamClient], None] = lambda _client: None,
    ) -> UpstreamClient:
        """The client for `upstream`, with the timeouts of `settings` (see the module)."""
        limit = pool_limit(upstream, settings)
        return cls(new_session(upstream, settings), upstream, pool_limit=limit, on_idle=on_idle)

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has closed the session."""
        return self._session.closed

    def serves(self, upstream: Upstream, settings: BrokerSettings) -> bool:
        """Whether this client talks to `upstream` as configured now (URL, key, pool)."""
        return (upstream.base_url, upstream.api_key, pool_limit(upstream, settings)) == (
            self.upstream.base_url,
            self.upstream.api_key,
            self.pool_limit,
        )

    def stream(self, payload: dict[str, Any]) -> ChatStream:
        """A streamed Chat Completions call with this JSON body (see `translate`)."""
        return ChatStream(
            self._session,
            self._url,
            payload,
            headers=self._headers,
            proxy=self.proxy,
            secrets=self._secrets,
            opened=self._opened,
            closed=self._closed,
        )

    def _opened(self) -> None:
        self.active += 1

    def _closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._on_idle(self)

    async def aclose(self) -> None:
        """Close the session and its connection pool (responses still open included)."""
        await self._session.close()

    def __repr__(self) -> str:
        return f"UpstreamClient({self.description!r}, active={self.active})"


class UpstreamClients:
    """The clients of the upstreams calls are routed to, by upstream name.

    Clients are built on first use and rebuilt when the configuration of their
    upstream changes; see the module docstring for when old ones are closed.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        """Args:
        settings: the timeouts of every client, and the pool limit of an
            upstream whose tenants file entry sets no `max_concurrent`.
        """
        self._settings = settings
        self._clients: dict[str, UpstreamClient] = {}
        # Replaced clients that still have calls in flight.
        self._retired: set[UpstreamClient] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, upstream: Upstream) -> UpstreamClient:
        """The client for `upstream` as configured now; built if there is none yet.

        A client built for another URL, key or pool limit of the same upstream name is
        retired and replaced.
        """
        current = self._clients.get(upstream.name)
        if current is not None and current.serves(upstream, self._settings):
            return current
        fresh = UpstreamClient.build(upstream, self._settings, on_idle=self._idle)
        self._clients[upstream.name] = fresh
        if current is not None:
            self._retire(current)
        log.info(
            "upstream client built",
            extra={"upstream": upstream.name, "upstream_host": upstream_host(upstream.base_url)},
        )
        return fresh

    def reconcile(self, directory: TenantDirectory) -> None:
        """Retire the clients of upstreams that `directory` changed or removed.

        Meant for `LiveTenants.subscribe`: it runs on the event loop after each
        reload and never blocks. Replacements are built by the next call.
        """
        for name, existing in list(self._clients.items()):
            upstream = directory.upstreams.get(name)
            if upstream is None or not existing.serves(upstream, self._settings):
                del self._clients[name]
                self._retire(existing)

    def current(self) -> dict[str, UpstreamClient]:
        """The clients in use now, by upstream name (retired ones excluded)."""
        return dict(self._clients)

    def _retire(self, old: UpstreamClient) -> None:
        log.info(
            "upstream client retired",
            extra={"upstream": old.name, "in_flight": old.active},
        )
        self._retired.add(old)
        if old.active == 0:
            self._idle(old)

    def _idle(self, old: UpstreamClient) -> None:
        """Close a retired client once its last call is over (a no-op for current ones)."""
        if old not in self._retired:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to close it on: `aclose()` will
        self._retired.discard(old)
        task = loop.create_task(old.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every client, current and retired (after the server has drained)."""
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        pending = [*self._closing, *(client.aclose() for client in clients)]
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("closing an upstream client failed", exc_info=result)
