"""Fixtures shared by the whole suite: real servers, started cheaply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.redis_server import RedisCluster3, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, once per test session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster3]:
    """A real 3-node Redis Cluster on 127.0.0.1, once per test session."""
    with RedisCluster3() as cluster:
        yield cluster
