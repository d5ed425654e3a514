"""Run the gateway: `python -m switchboard.gateway`."""

from __future__ import annotations

import asyncio
import socket
import sys
from types import FrameType

import uvicorn

from switchboard.config import ConfigError, GatewaySettings
from switchboard.gateway.app import Drainer, create_app
from switchboard.telemetry.logs import configure_logging
from switchboard.telemetry.tracing import configure_tracing
from switchboard.tenancy import load_tenants


def main() -> None:
    try:
        settings = GatewaySettings.from_environ()
        configure_logging("gateway", settings.log_level)
        # Spans still queued are flushed at exit (switchboard.tracing).
        configure_tracing("gateway")
        app = create_app(settings, load_tenants())
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ping_interval_s or None,
        ws_ping_timeout=settings.ping_timeout_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, app.state.drainer, settings.drain_timeout_s).run(
        sockets=[listen(settings)]
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its shutdown.

    On the first SIGTERM or SIGINT, the gateway drains (readiness false, new
    connections refused, running responses finish, connections closed with 1012)
    for up to the drain timeout, then uvicorn shuts down as usual. A second
    signal skips the rest of the drain.
    """

    def __init__(self, config: uvicorn.Config, drainer: Drainer, timeout_s: float) -> None:
        super().__init__(config)
        self.drainer = drainer
        self.timeout_s = timeout_s
        self._drain: asyncio.Task[None] | None = None
        self._signalled = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signalled += 1
        if self._signalled > 1:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain is None:
            self._drain = asyncio.create_task(self.drainer.drain(self.timeout_s))
        if self._drain is not None and self._drain.done():
            return True
        return await super().on_tick(counter)


def listen(settings: GatewaySettings) -> socket.socket:
    """The listening socket; its send buffer size is inherited by every connection.

    A fixed SO_SNDBUF caps the kernel memory one client that stops reading can
    hold (autotuning lets it grow to megabytes), and makes such a client felt in
    the gateway's outbox sooner.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    sock.bind((settings.host, settings.port))
    return sock


if __name__ == "__main__":
    main()
