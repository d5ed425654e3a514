"""Run the gateway: `python -m switchboard.gateway`."""

from __future__ import annotations

import socket
import sys

import uvicorn

from switchboard.config import ConfigError, GatewaySettings
from switchboard.gateway.app import create_app
from switchboard.gateway.drain import DrainingServer
from switchboard.gateway.transport import protocols
from switchboard.rpc import tune_gc
from switchboard.telemetry.logs import configure_logging
from switchboard.telemetry.tracing import configure_tracing
from switchboard.tenancy import load_tenants


def main() -> None:
    try:
        settings = GatewaySettings.from_environ()
        configure_logging("gateway", settings.log_level)
        # Spans still queued are flushed at exit (switchboard.telemetry.tracing).
        configure_tracing("gateway")
        app = create_app(settings, load_tenants())
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    http, ws = protocols(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http,
        ws=ws,
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ping_interval_s or None,
        ws_ping_timeout=settings.ping_timeout_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    tune_gc()
    DrainingServer(config, app.state.drainer, settings.drain_timeout_s).run(
        sockets=[listen(settings)]
    )


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
