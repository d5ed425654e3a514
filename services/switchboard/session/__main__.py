"""Run the session service: `python -m switchboard.session`.

Reads `SessionSettings` from the environment (a bad value exits with status 2 and
a one-line message naming the variable), opens the Redis client, serves gRPC with
a readiness probe that reports NOT_SERVING while Redis does not answer (and
Prometheus metrics on `SWITCHBOARD_SESSION_METRICS_LISTEN`), and closes the
client after the server has drained.
"""

from __future__ import annotations

import asyncio

from redis.asyncio.connection import parse_url

from switchboard import rpc
from switchboard.config import ConfigError, SessionSettings
from switchboard.redis_client import any_client, warm_up
from switchboard.session.service import SERVICE_NAME, SessionServicer
from switchboard.session.store import SessionStore


async def run(settings: SessionSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then close the Redis client."""
    client = any_client(settings.redis_url.reveal(), cluster=settings.redis_cluster)
    await warm_up(client)
    try:
        store = SessionStore(client, ttl_s=settings.session_ttl_s)
        servicer = SessionServicer(store, default_context_tokens=settings.context_tokens)

        async def ready() -> bool:
            up = await store.ping()
            servicer.metrics.redis_up.set(1 if up else 0)
            return up

        metrics = None
        if settings.metrics_listen:
            metrics = (settings.metrics_listen, servicer.metrics.registry)
        await rpc.serve(
            SERVICE_NAME,
            settings.listen,
            servicer.register,
            probe=ready,
            stop=stop,
            metrics=metrics,
        )
    finally:
        await client.aclose()


def load_settings() -> SessionSettings:
    settings = SessionSettings.from_environ()
    try:
        # Parse the URL now so a malformed one fails start-up, not the first call.
        parse_url(settings.redis_url.reveal())
    except ValueError as exc:
        # redis-py's messages name the bad part, never the URL (it may hold a password).
        raise ConfigError(f"SWITCHBOARD_REDIS_URL: {exc}") from None
    return settings


def main() -> None:
    rpc.main("session", load_settings, run)


if __name__ == "__main__":
    main()
