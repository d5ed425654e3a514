"""Redis clients for the services: fail fast when Redis is away, never retry a write."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from switchboard.errors import SwitchboardError

__all__ = [
    "REDIS_UNAVAILABLE",
    "AnyRedis",
    "any_client",
    "cluster_client",
    "redis_client",
    "translate_outage",
    "warm_up",
]

# What the stores take: a standalone client or a Redis Cluster client. Every
# multi-key operation of a store touches keys under one hash tag, so both work.
AnyRedis = Redis | RedisCluster

# Failures that mean "Redis cannot serve right now" (down, restarting, loading its
# data set, a replica not yet promoted, out of memory, a cluster without a
# reachable node or slot owner), as opposed to a bug in a command.
REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,  # ClusterDownError, MasterDownError
    redis.exceptions.RedisClusterException,  # SlotNotCoveredError, no reachable node
)

P = ParamSpec("P")
R = TypeVar("R")


def translate_outage(
    error: Callable[[], SwitchboardError],
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a store method so that a Redis outage inside it raises `error()`."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await method(*args, **kwargs)
            except REDIS_UNAVAILABLE as exc:
                raise error() from exc

        return call

    return decorate


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


def cluster_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> RedisCluster:
    """A Redis Cluster client from the URL of any node, with the same fail-fast timeouts.

    Call `await client.initialize()` before serving: a cluster client that gets a
    burst before it has learned the slot layout can fail (redis-py 8.1).
    """
    return RedisCluster.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        max_connections=max_connections,
    )


def any_client(url: str, *, cluster: bool, timeout_s: float = 1.0) -> AnyRedis:
    """`cluster_client` or `redis_client`, as the deployment's Redis is."""
    return (
        cluster_client(url, timeout_s=timeout_s)
        if cluster
        else redis_client(url, timeout_s=timeout_s)
    )


async def warm_up(client: AnyRedis) -> None:
    """Learn a cluster's slot layout before the first burst; a standalone client
    needs nothing. A cluster that is down now is learned on first use instead."""
    if isinstance(client, RedisCluster):
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await client.initialize()
