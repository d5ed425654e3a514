"""How the limiter fails: Redis away or hung, bad ids, refusals as errors."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable

import pytest

from switchboard.errors import InvalidRequest
from switchboard.limits import (
    RATE_LIMIT_EXCEEDED,
    Decision,
    LimitsStoreUnavailable,
    RateLimitExceeded,
    TenantLimiter,
)
from switchboard.redis_client import redis_client
from tools.redis_server import RedisServer


def every_call(limiter: TenantLimiter, tenant: str) -> list[Awaitable[object]]:
    return [
        limiter.admit_request(tenant, per_minute=1),
        limiter.acquire(tenant, "connections", "h", limit=1, lease_s=1),
        limiter.renew(tenant, "connections", "h", lease_s=1),
        limiter.release(tenant, "connections", "h"),
        limiter.reserve_tokens(tenant, "r1", 1, per_minute=1, per_day=1),
        limiter.settle_tokens(tenant, "r1", 1),
        limiter.usage(tenant, requests_per_minute=1, tokens_per_minute=1),
    ]


async def test_an_unreachable_redis_fails_fast_as_unavailable() -> None:
    dead = RedisServer()  # never started: nothing listens on its port
    client = redis_client(dead.url)
    try:
        started = time.monotonic()
        for call in every_call(TenantLimiter(client), "acme"):
            with pytest.raises(LimitsStoreUnavailable) as caught:
                await call
            assert caught.value.message == "The limits store is unavailable."
            assert caught.value.name == "service_unavailable"
            assert caught.value.spec.retryable and caught.value.retry_after == 1.0
        assert time.monotonic() - started < 2.0
    finally:
        await client.aclose()
        dead.close()


async def test_a_hung_redis_times_out_instead_of_hanging(tenant: str) -> None:
    with RedisServer() as server:
        client = redis_client(server.url, timeout_s=0.3)
        limiter = TenantLimiter(client)
        process = server._process
        assert process is not None
        try:
            assert (await limiter.admit_request(tenant, per_minute=1)).allowed
            process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
            started = time.monotonic()
            with pytest.raises(LimitsStoreUnavailable):
                await limiter.reserve_tokens(tenant, "r1", 1, per_minute=1, per_day=None)
            assert time.monotonic() - started < 1.0
        finally:
            process.send_signal(signal.SIGCONT)
            await client.aclose()


async def test_ids_are_checked_before_reaching_redis() -> None:
    dead = RedisServer()
    client = redis_client(dead.url)
    limiter = TenantLimiter(client)
    try:
        for bad in ["", "a{b}", "a:b", "x" * 65, "é"]:
            with pytest.raises(InvalidRequest):
                await limiter.admit_request(bad, per_minute=1)
        with pytest.raises(InvalidRequest):
            await limiter.acquire("acme", "Conn{}", "h", limit=1, lease_s=1)
        with pytest.raises(InvalidRequest):
            await limiter.acquire("acme", "connections", "", limit=1, lease_s=1)
        with pytest.raises(InvalidRequest):
            await limiter.reserve_tokens("acme", "r{1}", 1, per_minute=1, per_day=1)
        with pytest.raises(ValueError, match="per_minute"):
            await limiter.admit_request("acme", per_minute=-1)
        with pytest.raises(ValueError, match="lease_s"):
            await limiter.acquire("acme", "connections", "h", limit=1, lease_s=0)
    finally:
        await client.aclose()
        dead.close()


def test_a_refusal_becomes_the_matching_error() -> None:
    refused = Decision(False, 50, 0, 12.5, RATE_LIMIT_EXCEEDED)
    error = refused.error("Rate limit reached for requests.")
    assert isinstance(error, RateLimitExceeded)
    assert (error.name, error.retry_after, error.spec.http_status) == (
        "rate_limit_exceeded",
        12.5,
        429,
    )
    with pytest.raises(ValueError, match="allowed"):
        Decision(True, 50, 49, 0.0, None).error("no")
