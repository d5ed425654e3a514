"""Token reservations, settlement, the daily budget and usage() on a real redis-server."""

from __future__ import annotations

from redis.asyncio import Redis

from switchboard.limits import (
    INSUFFICIENT_QUOTA,
    RATE_LIMIT_EXCEEDED,
    UNLIMITED,
    Decision,
    QuotaExceeded,
)
from switchboard.v1 import common_pb2
from tests.limits.conftest import MIDNIGHT, FakeClock, Replicas, rid, spread

# Tokens.


async def test_reservations_admit_exactly_the_budget_and_settling_frees_it(
    replicas: Replicas, tenant: str
) -> None:
    ids = [rid() for _ in range(100)]
    decisions = await spread(
        replicas,
        100,
        lambda limiter, i: limiter.reserve_tokens(
            tenant, ids[i], 1000, per_minute=20_000, per_day=None
        ),
    )
    granted = [i for i, d in zip(ids, decisions, strict=True) if d.allowed]
    assert len(granted) == 20
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(0, 20_000, 1000))
    refused = {(d.code, d.limit, d.remaining, d.retry_after_s) for d in decisions if not d.allowed}
    # Reserved at 12:00:00.5 in the bucket of second 12:00:00, which leaves at 12:01:01.
    assert refused == {(RATE_LIMIT_EXCEEDED, 20_000, 0, 60.5)}

    first, second = replicas
    # Five responses used 200 tokens each, settled by the other replica: 4000 free.
    for reservation in granted[:5]:
        await second.settle_tokens(tenant, reservation, 200)
        # Settled already: a repeat (even with another amount) changes nothing.
        await first.settle_tokens(tenant, reservation, 200)
        await first.settle_tokens(tenant, reservation, 0)
    await first.settle_tokens(tenant, rid(), 5)  # unknown: a no-op
    more = await spread(
        replicas,
        10,
        lambda limiter, _: limiter.reserve_tokens(
            tenant, rid(), 1000, per_minute=20_000, per_day=None
        ),
    )
    assert sum(d.allowed for d in more) == 4
    state = await first.usage(tenant, requests_per_minute=None, tokens_per_minute=20_000)
    assert state.tokens.remaining == 0
    # Retrying a granted reservation charges nothing more.
    assert (
        await first.reserve_tokens(tenant, granted[7], 1000, per_minute=20_000, per_day=None)
    ).allowed


async def test_settling_more_than_reserved_counts_the_overshoot(
    replicas: Replicas, tenant: str
) -> None:
    first, second = replicas
    reservation = rid()
    assert (
        await first.reserve_tokens(tenant, reservation, 1000, per_minute=5000, per_day=None)
    ).allowed
    await second.settle_tokens(tenant, reservation, 3000)
    state = await first.usage(tenant, requests_per_minute=None, tokens_per_minute=5000)
    assert state.tokens.remaining == 2000
    too_many = await first.reserve_tokens(tenant, rid(), 2001, per_minute=5000, per_day=None)
    assert (too_many.allowed, too_many.remaining) == (False, 2000)
    fits = await second.reserve_tokens(tenant, rid(), 2000, per_minute=5000, per_day=None)
    assert (fits.allowed, fits.remaining) == (True, 0)


async def test_token_window_slides(replicas: Replicas, tenant: str, clock: FakeClock) -> None:
    first, second = replicas
    assert (
        await first.reserve_tokens(tenant, rid(), 15_000, per_minute=20_000, per_day=None)
    ).allowed
    clock.advance(30)
    assert (
        await second.reserve_tokens(tenant, rid(), 5000, per_minute=20_000, per_day=None)
    ).allowed
    refused = await first.reserve_tokens(tenant, rid(), 10_000, per_minute=20_000, per_day=None)
    # The 15 000 of +0 leave at +60.5 (end of their 1 s bucket + 60 s).
    assert (refused.allowed, refused.retry_after_s) == (False, 30.5)
    huge = await first.reserve_tokens(tenant, rid(), 25_000, per_minute=20_000, per_day=None)
    assert (huge.allowed, huge.retry_after_s) == (False, 60.5)  # until the window is empty
    clock.advance(30.5)
    assert (
        await second.reserve_tokens(tenant, rid(), 15_000, per_minute=20_000, per_day=None)
    ).allowed


async def test_daily_budget_refuses_until_utc_midnight(
    replicas: Replicas, tenant: str, clock: FakeClock, clients: tuple[Redis, Redis]
) -> None:
    first, second = replicas
    clock.now = MIDNIGHT + 86_400 - 3600  # 23:00:00Z
    late = rid()
    granted = await first.reserve_tokens(tenant, late, 3000, per_minute=100_000, per_day=5000)
    # Reported against the tighter limit: 2000 of the day's 5000 are left.
    assert (granted.allowed, granted.limit, granted.remaining) == (True, 5000, 2000)
    refused = await second.reserve_tokens(tenant, rid(), 3000, per_minute=100_000, per_day=5000)
    assert (refused.allowed, refused.code, refused.limit, refused.remaining) == (
        False,
        INSUFFICIENT_QUOTA,
        5000,
        2000,
    )
    assert refused.retry_after_s == 3600.0
    error = refused.error("You exceeded your daily token budget.")
    assert isinstance(error, QuotaExceeded)
    assert (error.code, error.retry_after) == (common_pb2.ERROR_CODE_INSUFFICIENT_QUOTA, 3600.0)

    clock.advance(3600)  # a new UTC day; the late response is settled in it
    await second.settle_tokens(tenant, late, 1000)
    days = await clients[0].hgetall(f"sb:limits:{{{tenant}}}:tokens:day")
    # The correction went to the day the tokens were charged to.
    assert days == {str(int(MIDNIGHT // 86_400)).encode(): b"1000"}  # 2026-03-02
    fresh = await first.reserve_tokens(tenant, rid(), 5000, per_minute=None, per_day=5000)
    assert (fresh.allowed, fresh.remaining) == (True, 0)


async def test_unlimited_tokens_are_always_granted(replicas: Replicas, tenant: str) -> None:
    decision = await replicas[0].reserve_tokens(tenant, rid(), 10**9, per_minute=None, per_day=None)
    assert decision == Decision(True, UNLIMITED, UNLIMITED, 0.0, None)


# Usage for rate_limits.updated.


async def test_usage_reports_remaining_and_reset(
    replicas: Replicas, tenant: str, clock: FakeClock
) -> None:
    first, second = replicas
    for _ in range(3):
        await first.admit_request(tenant, per_minute=10)
    clock.advance(10)
    await second.reserve_tokens(tenant, rid(), 1500, per_minute=10_000, per_day=None)
    state = await second.usage(tenant, requests_per_minute=10, tokens_per_minute=10_000)
    assert state.to_event() == [
        {"name": "requests", "limit": 10, "remaining": 7, "reset_seconds": 50.0},
        {"name": "tokens", "limit": 10_000, "remaining": 8500, "reset_seconds": 60.5},
    ]
    # Over the limit (settled above a lower limit): remaining is 0, never negative.
    assert (await first.usage(tenant, requests_per_minute=2, tokens_per_minute=1000)).to_event()[0][
        "remaining"
    ] == 0
    unlimited = await first.usage(tenant, requests_per_minute=None, tokens_per_minute=None)
    assert unlimited.to_event() == [
        {"name": "requests", "limit": UNLIMITED, "remaining": UNLIMITED, "reset_seconds": 0.0},
        {"name": "tokens", "limit": UNLIMITED, "remaining": UNLIMITED, "reset_seconds": 0.0},
    ]
    clock.advance(61)
    idle = await first.usage(tenant, requests_per_minute=10, tokens_per_minute=10_000)
    assert idle.to_event()[1] == {
        "name": "tokens",
        "limit": 10_000,
        "remaining": 10_000,
        "reset_seconds": 0.0,
    }
