"""Run the gateway: `python -m switchboard.gateway`."""

from __future__ import annotations

import sys

import uvicorn

from switchboard.config import ConfigError, GatewaySettings
from switchboard.gateway.app import create_app
from switchboard.telemetry import configure_logging


def main() -> None:
    try:
        settings = GatewaySettings.from_environ()
        app = create_app(settings)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("gateway", settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
