"""Redis clients for the services: fail fast when Redis is away, never retry a write."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

__all__ = ["redis_client"]


def redis_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> Redis:
    """A redis.asyncio client for the store that fails fast when Redis is away.

    Connect and read timeouts are `timeout_s`. Commands are not retried (a retried
    script could apply a write twice); the pool instead replaces connections that a
    restarted Redis closed before handing them out. Callers beyond
    `max_connections` wait up to `timeout_s` for one. Close it with `aclose()`.

    Raises:
        ValueError: the URL cannot be parsed.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        # Left on ("auto"), redis-py skips its check for connections a restarted
        # server closed, and the first command on each fails. Maintenance
        # notifications are a managed-Redis feature Switchboard does not use.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return Redis.from_pool(pool)
