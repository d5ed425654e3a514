"""Requests per minute and concurrent slots against a real redis-server.

Two limiters on separate clients (two connection pools) stand in for two replicas.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.crc import key_slot

from switchboard.limits import RATE_LIMIT_EXCEEDED, TenantLimiter
from switchboard.redis_client import redis_client
from tests.limits.conftest import FakeClock, Replicas, rid, spread
from tools.redis_server import RedisServer

# Requests per minute.


async def test_admit_request_admits_exactly_the_limit_across_replicas(
    replicas: Replicas, tenant: str, clock: FakeClock
) -> None:
    decisions = await spread(
        replicas, 300, lambda limiter, _: limiter.admit_request(tenant, per_minute=50)
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 50
    # Each admission saw a different count: none was decided on a stale one.
    assert sorted(d.remaining for d in allowed) == list(range(50))
    refused = [d for d in decisions if not d.allowed]
    assert {(d.code, d.remaining, d.limit, d.retry_after_s) for d in refused} == {
        (RATE_LIMIT_EXCEEDED, 0, 50, 60.0)
    }
    clock.advance(59.999)
    late = await replicas[0].admit_request(tenant, per_minute=50)
    assert (late.allowed, late.retry_after_s) == (False, 0.001)
    clock.advance(0.001)  # the admissions are exactly 60 s old: out of the window
    again = await spread(
        replicas, 60, lambda limiter, _: limiter.admit_request(tenant, per_minute=50)
    )
    assert sum(d.allowed for d in again) == 50


async def test_request_window_slides_rather_than_resets(
    replicas: Replicas, tenant: str, clock: FakeClock
) -> None:
    first, second = replicas
    for _ in range(3):
        assert (await first.admit_request(tenant, per_minute=3)).allowed
        clock.advance(20)
    fourth = await second.admit_request(tenant, per_minute=3)  # at +60: the first left
    assert fourth.allowed
    clock.advance(1)  # +61: the admissions of +20, +40 and +60 are in the window
    refused = await first.admit_request(tenant, per_minute=3)
    assert (refused.allowed, refused.retry_after_s) == (False, 19.0)
    zero = await first.admit_request(tenant, per_minute=0)
    assert (zero.allowed, zero.code, zero.retry_after_s) == (False, RATE_LIMIT_EXCEEDED, 19.0)


# Concurrent slots.


async def test_acquire_gives_exactly_the_limit_and_release_frees_one(
    replicas: Replicas, tenant: str
) -> None:
    holders = [f"conn-{i}" for i in range(100)]
    decisions = await spread(
        replicas,
        100,
        lambda limiter, i: limiter.acquire(tenant, "connections", holders[i], limit=5, lease_s=30),
    )
    winners = [h for h, d in zip(holders, decisions, strict=True) if d.allowed]
    assert len(winners) == 5
    assert sorted(d.remaining for d in decisions if d.allowed) == [0, 1, 2, 3, 4]
    assert all(d.retry_after_s == 30.0 for d in decisions if not d.allowed)
    first, second = replicas
    # Acquiring again keeps the one slot; a loser still gets nothing.
    assert (await second.acquire(tenant, "connections", winners[0], limit=5, lease_s=30)).allowed
    losers = [h for h in holders if h not in winners]
    assert not (await first.acquire(tenant, "connections", losers[0], limit=5, lease_s=30)).allowed
    # Another kind has its own slots.
    assert (await first.acquire(tenant, "responses", losers[0], limit=1, lease_s=30)).allowed

    await second.release(tenant, "connections", winners[0])
    await second.release(tenant, "connections", winners[0])  # idempotent
    retry = await spread(
        replicas,
        95,
        lambda limiter, i: limiter.acquire(tenant, "connections", losers[i], limit=5, lease_s=30),
    )
    assert sum(d.allowed for d in retry) == 1
    assert not await first.renew(tenant, "connections", winners[0], lease_s=30)


async def test_an_unrenewed_lease_frees_its_slot(
    replicas: Replicas, tenant: str, clock: FakeClock
) -> None:
    first, second = replicas
    assert (await first.acquire(tenant, "responses", "a", limit=2, lease_s=0.3)).allowed
    assert (await first.acquire(tenant, "responses", "b", limit=2, lease_s=0.3)).allowed
    clock.advance(0.2)
    full = await second.acquire(tenant, "responses", "c", limit=2, lease_s=0.3)
    assert (full.allowed, full.retry_after_s) == (False, 0.1)
    assert await second.renew(tenant, "responses", "a", lease_s=0.3)  # "a" now ends at +0.5
    clock.advance(0.1)  # +0.3: "b" (a crashed replica's) is gone, "a" is not
    assert (await second.acquire(tenant, "responses", "c", limit=2, lease_s=0.3)).allowed
    assert not (await second.acquire(tenant, "responses", "d", limit=2, lease_s=0.3)).allowed
    assert not await first.renew(tenant, "responses", "b", lease_s=0.3)
    clock.advance(0.2)  # +0.5: "a" ended too; renewing cannot revive it
    assert not await first.renew(tenant, "responses", "a", lease_s=0.3)
    assert (await first.acquire(tenant, "responses", "d", limit=2, lease_s=0.3)).allowed


async def test_a_lease_ends_in_real_time(redis_server: RedisServer, tenant: str) -> None:
    client = redis_client(redis_server.url)
    limiter = TenantLimiter(client)  # time.time
    try:
        assert (await limiter.acquire(tenant, "connections", "a", limit=1, lease_s=1.0)).allowed
        refused = await limiter.acquire(tenant, "connections", "b", limit=1, lease_s=1.0)
        assert not refused.allowed and 0 < refused.retry_after_s <= 1.0
        await asyncio.sleep(refused.retry_after_s + 0.01)
        assert (await limiter.acquire(tenant, "connections", "b", limit=1, lease_s=1.0)).allowed
    finally:
        await client.aclose()


# Keys, scripts, errors.


async def test_keys_share_one_slot_and_expire(
    replicas: Replicas, tenant: str, clients: tuple[Redis, Redis]
) -> None:
    limiter = replicas[0]
    reservation = rid()
    await limiter.admit_request(tenant, per_minute=5)
    await limiter.acquire(tenant, "connections", "c1", limit=5, lease_s=30)
    await limiter.reserve_tokens(tenant, reservation, 10, per_minute=100, per_day=1000)
    keys = sorted(k.decode() for k in await clients[0].keys(f"sb:limits:{{{tenant}}}:*"))  # type: ignore[union-attr]
    prefix = f"sb:limits:{{{tenant}}}"
    assert keys == sorted(
        [
            f"{prefix}:requests",
            f"{prefix}:slots:connections",
            f"{prefix}:tokens:minute",
            f"{prefix}:tokens:day",
            f"{prefix}:reservation:{reservation}",
        ]
    )
    assert len({key_slot(k.encode()) for k in keys}) == 1
    for key in keys:
        assert 0 < await clients[0].pttl(key) <= 3 * 86_400_000


async def test_scripts_are_reloaded_after_a_script_flush(
    replicas: Replicas, tenant: str, clients: tuple[Redis, Redis]
) -> None:
    assert (await replicas[0].admit_request(tenant, per_minute=2)).allowed
    await clients[0].script_flush()  # as after a restart or failover
    assert (await replicas[0].admit_request(tenant, per_minute=2)).allowed
    assert not (await replicas[1].admit_request(tenant, per_minute=2)).allowed
