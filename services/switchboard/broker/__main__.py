"""Run the broker service: `python -m switchboard.broker`.

Reads `BrokerSettings` and the tenants (`SWITCHBOARD_TENANTS_FILE`, or the
development `SWITCHBOARD_TENANT_KEYS`) from the environment; a bad value or a
bad tenants file exits with status 2 and a one-line message naming the
variable or the key path. Then it serves gRPC until SIGTERM/SIGINT while
watching the tenants file, and after the server has drained cancels the calls
it still holds (orphans included) and closes the upstream clients.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from switchboard import rpc
from switchboard.broker.moderation import moderation_service
from switchboard.broker.service import SERVICE_NAME, running
from switchboard.config import BrokerSettings
from switchboard.telemetry.logs import configure_logging
from switchboard.tenancy import LiveTenants, load_tenants


@dataclass(frozen=True, slots=True)
class BrokerStartup:
    """What the broker loads before it serves: its settings and the tenants."""

    settings: BrokerSettings
    tenants: LiveTenants

    @property
    def log_level(self) -> str:
        return self.settings.log_level


def load(environ: Mapping[str, str] | None = None) -> BrokerStartup:
    """Settings and tenants from one environment (os.environ if None).

    Raises:
        ConfigError: a bad variable or tenants file (one line, no secrets).
    """
    env = os.environ if environ is None else environ
    settings = BrokerSettings.from_environ(env)
    # Loading the tenants may log (e.g. "no tenants configured"): as JSON, like the rest.
    configure_logging("broker", settings.log_level)
    return BrokerStartup(settings, load_tenants(env))


async def run(startup: BrokerStartup, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then cancel held calls, close clients."""
    settings = startup.settings
    async with (
        running(settings, startup.tenants) as servicer,
        moderation_service(startup.tenants) as moderator,
    ):
        metrics = None
        if settings.metrics_listen:
            metrics = (settings.metrics_listen, servicer.metrics.registry)

        def register(server: grpc.aio.Server) -> None:
            servicer.register(server)
            moderator.register(server)

        await rpc.serve(SERVICE_NAME, settings.listen, register, stop=stop, metrics=metrics)
    # Leaving `running` after the drain: in-flight streams have finished or been
    # cancelled, the calls still held (orphans) are cancelled next, so the
    # clients close under no one.


def main() -> None:
    rpc.main("broker", load, run)


if __name__ == "__main__":
    main()
