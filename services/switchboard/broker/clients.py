"""The broker's clients of its upstream deployments: one `openai.AsyncOpenAI` each.

An upstream is a named deployment of the tenants file (`switchboard.tenancy.Upstream`:
a base URL and a key). `UpstreamClients` builds the client of an upstream the first
time a call is routed to it and shares it between all the calls that follow,
so their connections are kept alive and reused.

When a reload of the tenants file changes an upstream's base URL or key, or
removes the upstream, its client is *retired*: the next call builds a fresh
one, calls already streaming finish on the old one, and the old one is closed
as soon as its last call is over. `aclose()` closes everything at shutdown.

Call order: build `UpstreamClients(settings)` at start, `tenants.subscribe(clients.reconcile)`,
`client(upstream)` per call (on the event loop), `await aclose()` after the
gRPC server has drained.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import openai

from switchboard.broker.chat_stream import MAX_RETRIES, ChatStream, upstream_host
from switchboard.config import BrokerSettings
from switchboard.tenancy import TenantDirectory, Upstream

log = logging.getLogger(__name__)

# Local servers (vLLM, Ollama, the simulator) need no key, but the SDK requires
# one; a placeholder makes a real API answer with a clear 401.
PLACEHOLDER_KEY = "no-key-configured"


def upstream_description(upstream: Upstream) -> str:
    """`name (host:port)`: what `Started.upstream` reports; never a key or a path."""
    return f"{upstream.name} ({upstream_host(upstream.base_url)})"


class UpstreamClient:
    """The SDK client of one upstream deployment, shared by every call routed to it.

    Attributes:
        upstream: the configuration it was built from (its key is a `Secret`).
        description: `name (host:port)`, safe to log and report.
        active: calls in flight (entered and not yet closed).
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        upstream: Upstream,
        *,
        on_idle: Callable[[UpstreamClient], None] = lambda _client: None,
    ) -> None:
        """Args:
        client: the SDK client; this object closes it in `aclose()`.
        upstream: where it points and with which key (the key is redacted
            from any upstream message that is passed on).
        on_idle: called each time the last call in flight ends.
        """
        self._client = client
        self.upstream = upstream
        self.description = upstream_description(upstream)
        self.active = 0
        self._on_idle = on_idle
        key = upstream.api_key.reveal()
        self._secrets = (key,) if key else ()
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def build(
        cls,
        upstream: Upstream,
        settings: BrokerSettings,
        *,
        on_idle: Callable[[UpstreamClient], None] = lambda _client: None,
    ) -> UpstreamClient:
        """The client for `upstream`: aiohttp transport, connect/read timeouts, no SDK retries."""
        # `read` bounds the silence between two chunks, not the whole stream.
        timeout = openai.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
        client = openai.AsyncOpenAI(
            base_url=upstream.base_url,
            api_key=upstream.api_key.reveal() or PLACEHOLDER_KEY,
            http_client=openai.DefaultAioHttpClient(timeout=timeout),
            max_retries=MAX_RETRIES,
            timeout=timeout,
        )
        return cls(client, upstream, on_idle=on_idle)

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has closed the SDK client."""
        return self._client.is_closed()

    def serves(self, upstream: Upstream) -> bool:
        """Whether this client talks to `upstream` as configured now (same URL and key)."""
        return (upstream.base_url, upstream.api_key) == (
            self.upstream.base_url,
            self.upstream.api_key,
        )

    def stream(self, payload: dict[str, Any]) -> ChatStream:
        """A streamed Chat Completions call with this JSON body (see `translate`)."""
        return ChatStream(
            self._client,
            payload,
            secrets=self._secrets,
            background=self._background,
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
        """Finish pending closes, then close the client and its connection pool."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._client.close()

    def __repr__(self) -> str:
        return f"UpstreamClient({self.description!r}, active={self.active})"


class UpstreamClients:
    """The clients of the upstreams calls are routed to, by upstream name.

    Clients are built on first use and rebuilt when the configuration of their
    upstream changes; see the module docstring for when old ones are closed.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        """Args:
        settings: the connect and read timeouts of every client.
        """
        self._settings = settings
        self._clients: dict[str, UpstreamClient] = {}
        # Replaced clients that still have calls in flight.
        self._retired: set[UpstreamClient] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, upstream: Upstream) -> UpstreamClient:
        """The client for `upstream` as configured now; built if there is none yet.

        A client built for another URL or key of the same upstream name is
        retired and replaced.
        """
        current = self._clients.get(upstream.name)
        if current is not None and current.serves(upstream):
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
            if upstream is None or not existing.serves(upstream):
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
