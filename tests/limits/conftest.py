"""Fixtures of the limits tests: a clock they move, a tenant each, two replicas.

The two replicas are two limiters on separate Redis clients (two connection
pools), as two gateway or broker pods would have.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from switchboard.limits import Decision, TenantLimiter
from switchboard.redis_client import redis_client
from tools.redis_server import RedisServer

Replicas = tuple[TenantLimiter, TenantLimiter]

# 2026-03-02T00:00:00Z, plus half a second so that times fall inside a token
# bucket (1 s) rather than on its edge.
MIDNIGHT = 1_772_409_600.0
START = MIDNIGHT + 12 * 3600 + 0.5


class FakeClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tenant() -> str:
    """A tenant of this test alone: the Redis servers are shared by the whole run."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[tuple[Redis, Redis]]:
    """Two clients with their own connection pools, as two replicas would have.

    Generous timeouts: these tests are about exactness, on machines that may be
    busy; test_failures.py uses the fail-fast defaults.
    """
    first, second = (
        redis_client(redis_server.url, timeout_s=5.0, max_connections=16) for _ in range(2)
    )
    yield first, second
    await first.aclose()
    await second.aclose()


@pytest.fixture
def replicas(clients: tuple[Redis, Redis], clock: FakeClock) -> Replicas:
    return TenantLimiter(clients[0], clock=clock), TenantLimiter(clients[1], clock=clock)


def rid() -> str:
    return f"resp_{uuid.uuid4().hex}"


async def spread(replicas: Replicas, n: int, call: Callable[..., Awaitable[Decision]]) -> list[Any]:
    """Run `call(limiter, i)` n times at once, alternating between the replicas."""
    return list(await asyncio.gather(*(call(replicas[i % 2], i) for i in range(n))))
