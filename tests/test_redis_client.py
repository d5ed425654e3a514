"""The services' Redis client: its pool's bound and hand-over, its packing, a
restarted server's closed connections replaced."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import redis.exceptions
import uvloop
from redis.asyncio import Redis

from switchboard.redis_client import FailFastPool, redis_client
from tools.redis_server import RedisServer


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    with RedisServer() as running:
        yield running


def pool_of(client: Redis) -> FailFastPool:
    pool = client.connection_pool
    assert isinstance(pool, FailFastPool)
    return pool


async def test_a_caller_beyond_the_bound_gets_the_next_released_connection(
    server: RedisServer,
) -> None:
    client = redis_client(server.url, max_connections=1)
    pool = pool_of(client)
    try:
        held = await pool.get_connection()
        waiting = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await pool.release(held)
        assert await waiting is held
        await pool.release(held)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_caller_waits_only_the_timeout_for_a_connection(server: RedisServer) -> None:
    client = redis_client(server.url, max_connections=1, timeout_s=0.1)
    pool = pool_of(client)
    try:
        held = await pool.get_connection()
        with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
            await pool.get_connection()
        await pool.release(held)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_connection_handed_to_a_caller_that_gave_up_goes_to_the_next(
    server: RedisServer,
) -> None:
    client = redis_client(server.url, max_connections=1)
    pool = pool_of(client)
    try:
        held = await pool.get_connection()
        first = asyncio.create_task(pool.get_connection())
        second = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.05)
        await pool.release(held)  # handed to `first`, which has not run yet
        first.cancel()
        assert await second is held
        assert first.cancelled()
        await pool.release(held)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_commands_round_trip_through_the_c_packer(server: RedisServer) -> None:
    client = redis_client(server.url)
    try:
        value = "é\n" + "x" * 100_000
        assert await client.set("key with spaces", value)
        assert await client.get("key with spaces") == value.encode()
        assert await client.hset("h", mapping={"n": 7, "f": 0.5, "b": b"\x00\xff"}) == 3
        assert await client.hgetall("h") == {b"n": b"7", b"f": b"0.5", b"b": b"\x00\xff"}
        with pytest.raises(redis.exceptions.DataError):
            await client.set("k", None)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_connections_a_restarted_server_closed_are_replaced_before_use(
    server: RedisServer,
) -> None:
    client = redis_client(server.url)
    try:
        # Several pooled connections, all of which the restart closes.
        await asyncio.gather(*(client.incr("n") for _ in range(8)))
        assert len(pool_of(client)._available_connections) > 1
        server.stop()
        server.start()
        # Let the loop see the old sockets close, as it would between requests
        # in a running service (stop/start above block the loop).
        await asyncio.sleep(0.1)
        counts = await asyncio.gather(*(client.incr("n") for _ in range(8)))
        assert sorted(counts) == list(range(1, 9))
    finally:
        await client.aclose()


async def test_a_pipeline_to_a_hung_server_times_out_and_the_connection_recovers(
    server: RedisServer,
) -> None:
    # The services' timeout: the commands after the hang must answer within it,
    # however busy the machine.
    client = redis_client(server.url, timeout_s=1.0)
    process = server._process
    assert process is not None
    try:
        assert await client.ping()
        process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incr("a").incr("b")
                with pytest.raises(redis.exceptions.TimeoutError):
                    await pipe.execute()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.incr("a")
        finally:
            process.send_signal(signal.SIGCONT)
        # Nothing of the timed-out commands is read as the reply of a later one.
        assert await client.set("c", "fresh")
        assert await client.get("c") == b"fresh"
    finally:
        await client.aclose()


async def test_an_idle_pooled_connection_outlives_the_deadline(server: RedisServer) -> None:
    client = redis_client(server.url, timeout_s=1.0)
    try:
        first = await client.client_id()
        await asyncio.sleep(1.5)  # the deadline of that use must have been stopped
        assert await client.client_id() == first
    finally:
        await client.aclose()


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_deadline_that_passed_before_the_send_is_a_timeout(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    # The event loop ran late between the checkout and the command: the deadline
    # aborted the socket, and uvloop raised RuntimeError writing to it (which no
    # store translates: a response's cost settlement failed the whole turn).
    async def scenario(url: str) -> None:
        client = redis_client(url, timeout_s=0.2)
        pool = pool_of(client)
        try:
            assert await client.ping()
            connection = await pool.get_connection()
            try:
                await asyncio.sleep(0.4)  # past the deadline of this use
                with pytest.raises(redis.exceptions.TimeoutError):
                    await connection.send_command("PING")
                with pytest.raises(redis.exceptions.TimeoutError):
                    await connection.read_response()
            finally:
                await pool.release(connection)
            assert await client.ping()
        finally:
            await client.aclose()

    with RedisServer() as server:
        run(scenario(server.url))
