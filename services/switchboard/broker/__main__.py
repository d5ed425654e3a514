"""Run the broker service: `python -m switchboard.broker`.

Reads `BrokerSettings` from the environment (a bad value exits with status 2
and a one-line message naming the variable), builds the upstream client, serves
gRPC until SIGTERM/SIGINT, and closes the client after the server has drained.
"""

from __future__ import annotations

import asyncio

from switchboard import rpc
from switchboard.broker.service import SERVICE_NAME, BrokerServicer
from switchboard.broker.upstream import Upstream
from switchboard.config import BrokerSettings


async def run(settings: BrokerSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then close the upstream client."""
    upstream = Upstream.from_settings(settings)
    try:
        servicer = BrokerServicer(upstream, settings)
        await rpc.serve(SERVICE_NAME, settings.listen, servicer.register, stop=stop)
    finally:
        # After the drain: in-flight streams have finished or been cancelled.
        await upstream.aclose()


def main() -> None:
    rpc.main("broker", BrokerSettings.from_environ, run)


if __name__ == "__main__":
    main()
