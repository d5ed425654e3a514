"""Run the toolexec service: `python -m switchboard.toolexec`.

Serves the built-in tools on `SWITCHBOARD_TOOLEXEC_LISTEN` with the standard
gRPC health service until SIGTERM/SIGINT, then drains (`switchboard.rpc.serve`).
A bad setting stops start-up with a one-line message naming the variable and
exit code 2.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import grpc

from switchboard import rpc
from switchboard.config import ConfigError, ToolExecSettings
from switchboard.telemetry import configure_logging
from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.service import ToolExecServicer
from switchboard.v1 import toolexec_pb2_grpc

SERVICE_NAME = "switchboard.v1.ToolExecService"


async def run(settings: ToolExecSettings) -> None:
    """Serve until told to stop; the registry and servicer live in this loop."""
    servicer = ToolExecServicer(builtin_registry())

    def register(server: grpc.aio.Server) -> None:
        toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

    await rpc.serve(SERVICE_NAME, settings.listen, register)


def main() -> None:
    try:
        settings = ToolExecSettings.from_environ()
    except ConfigError as exc:
        print(f"toolexec: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        configure_logging("toolexec", settings.log_level)
    except ValueError:
        # config.py takes SWITCHBOARD_LOG_LEVEL as any string; logging refuses unknown levels.
        print(
            "toolexec: configuration error: SWITCHBOARD_LOG_LEVEL must be a log level "
            f"(DEBUG, INFO, WARNING, ERROR), got {settings.log_level!r}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    _run_loop(run(settings))


def _run_loop(main_coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional here
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    main()
