"""The usage ledger and money budgets in a real Redis, from two replicas at once."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from redis.asyncio import Redis

from switchboard.limits import QuotaExceeded
from switchboard.limits.ledger import UsageLedger, report_window
from switchboard.v1 import common_pb2
from tests.limits.conftest import rid

NOW = datetime.datetime(2026, 12, 3, 22, 0, tzinfo=datetime.UTC)


def usage(prompt: int, output: int, *, estimated: bool = False) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=prompt + output,
        estimated=estimated,
    )


async def test_reservations_admit_exactly_what_the_budget_holds(
    clients: tuple[Redis, Redis], tenant: str
) -> None:
    ledgers = UsageLedger(clients[0]), UsageLedger(clients[1])
    waits: list[float | None] = []

    async def reserve(n: int) -> bool:
        try:
            await ledgers[n % 2].reserve(tenant, f"r{n}", 300, daily=1000, monthly=None, now=NOW)
        except QuotaExceeded as refused:
            waits.append(refused.retry_after)
            return False
        return True

    admitted = await asyncio.gather(*(reserve(n) for n in range(12)))
    assert sum(admitted) == 3
    assert set(waits) == {2 * 3600}  # until the next UTC day
    # Settling at less than reserved frees the rest for the next response.
    for n, allowed in enumerate(admitted):
        if allowed:
            await ledgers[0].settle(tenant, "s", f"r{n}", "m", usage(1, 1), 100, now=NOW)
    assert (await ledgers[1].spent(tenant, now=NOW)).day == 300
    assert await reserve(100)
    assert await reserve(101)
    assert not await reserve(102)


async def test_a_monthly_budget_spans_days(clients: tuple[Redis, Redis], tenant: str) -> None:
    ledger = UsageLedger(clients[0])
    first = NOW.replace(day=1)
    await ledger.reserve(tenant, rid(), 600, daily=None, monthly=1000, now=first)
    await ledger.settle(tenant, "s", rid(), "m", usage(1, 1), 600, now=first)
    with pytest.raises(QuotaExceeded) as refused:
        await ledger.reserve(tenant, rid(), 600, daily=None, monthly=1000, now=NOW)
    assert "monthly" in refused.value.message
    next_month = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    assert refused.value.retry_after == (next_month - NOW).total_seconds()


async def test_the_report_is_by_day_and_model_and_the_session_keeps_its_own(
    clients: tuple[Redis, Redis], tenant: str
) -> None:
    ledger = UsageLedger(clients[0])
    yesterday = NOW - datetime.timedelta(days=1)
    await ledger.settle(tenant, "sess_a", rid(), "gpt-4o", usage(10, 5), 7, now=yesterday)
    await ledger.settle(tenant, "sess_a", rid(), "gpt-4o", usage(20, 5), 11, now=NOW)
    await ledger.settle(
        tenant, "sess_b", rid(), "gpt-4o-mini", usage(3, 4, estimated=True), 2, now=NOW
    )
    rows = await ledger.report(tenant, yesterday.date(), NOW.date())
    assert [(r.day, r.model, r.requests, r.input_tokens, r.cost_pusd) for r in rows] == [
        ("2026-12-02", "gpt-4o", 1, 10, 7),
        ("2026-12-03", "gpt-4o", 1, 20, 11),
        ("2026-12-03", "gpt-4o-mini", 1, 3, 2),
    ]
    assert rows[-1].estimated == 1
    assert (await ledger.session(tenant, "sess_a"))["cost_pusd"] == 18
    assert await ledger.report("someone-else", yesterday.date(), NOW.date()) == []


def test_report_windows() -> None:
    today = NOW.date()
    assert report_window(None, None, today) == (today - datetime.timedelta(days=29), today)
    assert report_window("2026-12-01", "2026-12-02", today)[0] == datetime.date(2026, 12, 1)
    for since, until in (("2026-12-05", "2026-12-01"), ("yesterday", None), ("2020-01-01", None)):
        with pytest.raises(ValueError, match=r"."):
            report_window(since, until, today)
