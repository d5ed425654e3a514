"""Session fixtures: a store on the run's real Redis, and a tenant of each test's own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from switchboard.redis_client import redis_client
from switchboard.session.store import SessionStore
from tests.session.support import TTL_S
from tools.redis_server import RedisServer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = redis_client(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
def store(client: Redis) -> SessionStore:
    return SessionStore(client, ttl_s=TTL_S)


@pytest.fixture
def tenant() -> str:
    """A tenant of this test alone: the Redis server is shared by the whole run."""
    return f"t-{uuid.uuid4().hex[:12]}"
