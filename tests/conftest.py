"""Fixtures shared by the whole suite: real servers, started cheaply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, once per test session."""
    with RedisServer() as server:
        yield server
