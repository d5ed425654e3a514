"""Redis clients for the services: fail fast when Redis is away, never retry a write."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar

import redis.exceptions
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.driver_info import DriverInfo
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


# Packs commands in C, as redis-py's synchronous client does when hiredis is
# installed (its asyncio client packs them in Python: a fifth of a pipeline's cost).
_PACKER = HiredisRespSerializer()


class FailFastConnection(Connection):
    """redis-py's TCP connection with one deadline per use instead of a timer per
    command, packing commands with hiredis.

    redis-py sends every command under `asyncio.wait_for` (a task and a timer)
    and reads every reply under its own `asyncio.timeout`: a pipeline of five
    scripts set six timers, about a fifth of its cost to the caller.
    `FailFastPool` instead starts one deadline when it hands the connection out
    (`start_deadline`) and stops it when the connection comes back. A deadline
    that passes aborts the socket: the send or read waiting on it fails with
    `redis.exceptions.TimeoutError`, and the connection is reconnected before
    its next use. Outside a deadline (a connection not from `FailFastPool`),
    it sends and reads as redis-py does, with the socket timeout.
    """

    _deadline: asyncio.TimerHandle | None = None
    _expired = False

    def start_deadline(self, seconds: float) -> None:
        """Abort the socket unless `stop_deadline` is called within `seconds`."""
        self._expired = False
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire)

    def stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._writer is not None:
            self._expired = True
            self._writer.transport.abort()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = _PACKER.pack(*args)
        return packed

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if self._expired:
            # The deadline passed before the send (the event loop ran late): the
            # socket is aborted, and uvloop would raise RuntimeError writing to it.
            await self.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError("Timeout writing to socket")
        writer = self._writer
        if writer is None or self._deadline is None or self.health_check_interval:
            await super().send_packed_command(command, check_health)
            return
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer.writelines(command)
            # Returns at once unless the socket left part of it buffered; raises
            # if Redis closed the socket or the deadline aborted it.
            await writer.drain()
        except OSError as exc:
            await self.disconnect(nowait=True)
            if self._expired:
                raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
            raise redis.exceptions.ConnectionError(
                f"Error while writing to socket: {exc.args}"
            ) from exc
        except BaseException:
            # Part of a command may have been sent: the connection cannot be reused.
            await self.disconnect(nowait=True)
            raise

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (redis-py's signature)
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        if self._expired:
            await self.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError(f"Timeout reading from {self._host_error()}")
        if timeout is not None or self._deadline is None:
            return await super().read_response(
                disable_decoding,
                timeout,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        try:
            # math.inf: no timer of its own; the deadline bounds the read.
            return await super().read_response(
                disable_decoding,
                math.inf,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        except redis.exceptions.ConnectionError:
            if self._expired:
                raise redis.exceptions.TimeoutError(
                    f"Timeout reading from {self._host_error()}"
                ) from None
            raise


class FailFastPool(ConnectionPool):
    """A pool of at most `max_connections` connections; callers beyond them wait
    up to `timeout_s` for one, then get `ConnectionError("No connection available.")`.

    What `BlockingConnectionPool` does, without its per-checkout lock, condition,
    timer and metrics hooks (a third of a script call's cost to the gateway): a
    free connection is handed out at once; a released one goes to the longest
    waiter first. Before a connection is handed out it is connected, and one
    that Redis closed (a restart) or that holds unread data is replaced.
    """

    def __init__(self, *, timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._checkout_timeout_s = timeout_s
        # A command (or a pipeline), from checkout to release: connecting
        # included, each step of which also has its own connect timeout.
        self._command_timeout_s = kwargs.get("socket_timeout") or timeout_s
        self._waiters: collections.deque[asyncio.Future[AbstractConnection]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if self._available_connections:
            connection = self._available_connections.pop()
        elif len(self._in_use_connections) < self.max_connections:
            connection = self.make_connection()  # type: ignore[no-untyped-call]
        else:
            connection = await self._wait()
        self._in_use_connections.add(connection)
        if isinstance(connection, FailFastConnection):
            connection.start_deadline(self._command_timeout_s)
        try:
            if not connection.is_connected:
                await connection.connect()  # type: ignore[no-untyped-call]
            try:
                stale = await connection.can_read()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                stale = True
            if stale:
                # Closed by Redis (a restart), or a reply left unread: start afresh.
                await connection.disconnect()
                await connection.connect()  # type: ignore[no-untyped-call]
                if await connection.can_read():
                    raise redis.exceptions.ConnectionError("Connection not ready")
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def _wait(self) -> AbstractConnection:
        """A connection released within the timeout, handed over by `release`."""
        waiter: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._checkout_timeout_s):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection just as the caller gave up: pass it on.
                await self.release(waiter.result())
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise redis.exceptions.ConnectionError("No connection available.") from None
            raise

    async def release(self, connection: AbstractConnection) -> None:
        if isinstance(connection, FailFastConnection):
            connection.stop_deadline()
        self._in_use_connections.discard(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use_connections.add(connection)
                waiter.set_result(connection)
                return
        self._available_connections.append(connection)


def redis_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> Redis:
    """A redis.asyncio client for the store that fails fast when Redis is away.

    The connect timeout is `timeout_s`, and a command (or a pipeline) must be
    answered within `timeout_s` of taking its connection (`FailFastConnection`),
    else it raises `redis.exceptions.TimeoutError`. Commands are not retried (a
    retried script could apply a write twice); the pool instead replaces
    connections that a restarted Redis closed before handing them out. Callers
    beyond `max_connections` wait up to `timeout_s` for one (`FailFastPool`).
    Commands are packed and replies parsed by hiredis. For request and reply
    commands only: a blocking command or pub/sub would outlive the deadline.
    Close it with `aclose()`.

    Raises:
        ValueError: the URL cannot be parsed.
    """
    pool = FailFastPool.from_url(
        url,
        timeout_s=timeout_s,
        max_connections=max_connections,
        connection_class=FailFastConnection,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        # Left on ("auto"), redis-py skips its check for connections a restarted
        # server closed, and the first command on each fails. Maintenance
        # notifications are a managed-Redis feature Switchboard does not use.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        # Resolved once: each connection would look redis-py's version up in
        # the installed packages' metadata (milliseconds per new connection).
        driver_info=DriverInfo(),
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
