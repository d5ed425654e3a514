"""What each tenant spends, in tokens and money, and its budgets in money.

Every response's usage and cost are recorded per tenant, per UTC day and model,
and per session (`UsageLedger.settle`); `report` reads them back by day and
model (`GET /v1/usage`, `python -m switchboard.tenancy usage`). A cost is an
integer of pico-dollars: tokens x the model's price in micro-dollars per
million tokens (switchboard.tenancy.prices_section), so sums are exact; a
voice response's audio tokens are priced at the audio prices (`AudioTokens`).

Money budgets (a tenant's `money_budget: {daily_usd, monthly_usd}`) are
enforced as token budgets are (limiter.py): a response reserves its largest
possible cost (its prompt estimate at the input price plus its output cap at
the output price) before the model is called, and is refused with
`insufficient_quota` when what was spent and reserved plus that would pass a
budget; when it ends the reservation is replaced by the real cost. So
concurrent responses on any replica never overshoot a budget by more than what
one response spends beyond its reservation. Keys (one hash tag per tenant, so
each script runs on one Redis Cluster node):

    sb:usage:{<tenant>}:day:<YYYY-MM-DD>    hash  <model>|<counter> -> n; cost_pusd, reserved_pusd
    sb:usage:{<tenant>}:month:<YYYY-MM>     hash  cost_pusd, reserved_pusd
    sb:usage:{<tenant>}:session:<id>        hash  <counter> -> n
    sb:usage:{<tenant>}:reservation:<id>    hash  day month amount
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from switchboard.limits.decision import LimitsStoreUnavailable, QuotaExceeded
from switchboard.limits.limiter import UNAVAILABLE_MESSAGE, LuaScript, _prefix
from switchboard.redis_client import translate_outage
from switchboard.tenancy.prices_section import Price
from switchboard.v1 import common_pb2

PICODOLLARS_PER_USD = 10**12
# Usage by day is kept this long; a session's, as long as a session may live.
DAY_TTL_S = 400 * 86_400
SESSION_TTL_S = 2 * 86_400
RESERVATION_TTL_S = 2 * 86_400
COUNTERS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_pusd",
    "estimated",
)

_store_call = translate_outage(lambda: LimitsStoreUnavailable(UNAVAILABLE_MESSAGE, retry_after=1.0))

# KEYS: day, month, reservation. ARGV: amount, daily budget, monthly budget (-1: none), ttl.
_RESERVE = """
local day_used = tonumber(redis.call('HGET', KEYS[1], 'cost_pusd') or '0')
    + tonumber(redis.call('HGET', KEYS[1], 'reserved_pusd') or '0')
local month_used = tonumber(redis.call('HGET', KEYS[2], 'cost_pusd') or '0')
    + tonumber(redis.call('HGET', KEYS[2], 'reserved_pusd') or '0')
local amount = tonumber(ARGV[1])
local daily, monthly = tonumber(ARGV[2]), tonumber(ARGV[3])
if daily >= 0 and day_used + amount > daily then return {0, 'day', day_used} end
if monthly >= 0 and month_used + amount > monthly then return {0, 'month', month_used} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {1, '', 0} end
redis.call('HINCRBY', KEYS[1], 'reserved_pusd', amount)
redis.call('HINCRBY', KEYS[2], 'reserved_pusd', amount)
redis.call('HSET', KEYS[3], 'amount', amount, 'day', KEYS[1], 'month', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return {1, '', 0}
"""

# KEYS: day, month, session, reservation (may not exist). ARGV: model, the
# COUNTERS in order, day ttl, session ttl.
_SETTLE = """
local amount = tonumber(redis.call('HGET', KEYS[4], 'amount') or '0')
if amount > 0 and redis.call('HGET', KEYS[4], 'day') == KEYS[1] then
  redis.call('HINCRBY', KEYS[1], 'reserved_pusd', -amount)
end
if amount > 0 and redis.call('HGET', KEYS[4], 'month') == KEYS[2] then
  redis.call('HINCRBY', KEYS[2], 'reserved_pusd', -amount)
end
redis.call('DEL', KEYS[4])
local names = {'requests', 'input_tokens', 'cached_input_tokens', 'output_tokens',
               'cost_pusd', 'estimated'}
for i, name in ipairs(names) do
  redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|' .. name, ARGV[i + 1])
  redis.call('HINCRBY', KEYS[3], name, ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[1], 'cost_pusd', ARGV[6])
local month = redis.call('HINCRBY', KEYS[2], 'cost_pusd', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('EXPIRE', KEYS[3], ARGV[9])
return {tonumber(redis.call('HGET', KEYS[1], 'cost_pusd')), month}
"""


@dataclass(frozen=True, slots=True)
class AudioTokens:
    """The audio share of a response's usage (a Realtime response's
    `input_token_details.audio_tokens`, `.cached_tokens_details.audio_tokens`,
    `output_token_details.audio_tokens`): part of its input, cached input and
    output tokens, priced at the audio prices."""

    input: int = 0
    cached_input: int = 0
    output: int = 0


def cost_of(usage: common_pb2.Usage, price: Price | None, audio: AudioTokens | None = None) -> int:
    """A response's cost in pico-dollars (0 without a price): text tokens at the
    text prices, the `audio` share at the audio prices."""
    if price is None:
        return 0
    audio = audio or AudioTokens()
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    audio_in = min(audio.input, usage.input_tokens)
    audio_cached = min(audio.cached_input, audio_in, cached)
    text_in = usage.input_tokens - audio_in
    text_cached = min(cached - audio_cached, text_in)
    audio_out = min(audio.output, usage.output_tokens)
    audio_input, cached_audio_input, audio_output = price.audio
    return (
        (text_in - text_cached) * price.input
        + text_cached * price.cached_input
        + (audio_in - audio_cached) * audio_input
        + audio_cached * cached_audio_input
        + (usage.output_tokens - audio_out) * price.output
        + audio_out * audio_output
    )


def largest_cost(prompt_tokens: int, max_output_tokens: int, price: Price | None) -> int:
    """The most a response can cost within its output cap (what it reserves)."""
    if price is None:
        return 0
    return prompt_tokens * price.input + max_output_tokens * price.output


def usd(picodollars: int) -> float:
    return picodollars / PICODOLLARS_PER_USD


def picodollars(usd_amount: float) -> int:
    return round(usd_amount * PICODOLLARS_PER_USD)


@dataclass(frozen=True, slots=True)
class Spent:
    """What a tenant has spent so far today and this month (UTC), in pico-dollars."""

    day: int
    month: int


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One model's usage on one UTC day."""

    day: str
    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_pusd: int
    estimated: int

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.day,
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": usd(self.cost_pusd),
            "estimated_requests": self.estimated,
        }


def _today(now: datetime.datetime | None) -> datetime.date:
    return (now or datetime.datetime.now(datetime.UTC)).date()


class UsageLedger:
    """Usage, costs and money budgets of all tenants, exact across replicas."""

    def __init__(self, redis: Redis | RedisCluster) -> None:
        self._redis = redis
        self._reserve = LuaScript(redis, _RESERVE)
        self._settle = LuaScript(redis, _SETTLE)

    @staticmethod
    def _keys(tenant_id: str, day: datetime.date) -> tuple[str, str]:
        prefix = _usage_prefix(tenant_id)
        return f"{prefix}:day:{day.isoformat()}", f"{prefix}:month:{day.strftime('%Y-%m')}"

    @_store_call
    async def reserve(
        self,
        tenant_id: str,
        reservation_id: str,
        amount: int,
        *,
        daily: int | None,
        monthly: int | None,
        now: datetime.datetime | None = None,
    ) -> None:
        """Reserve `amount` pico-dollars against the tenant's money budgets.

        Raises:
            QuotaExceeded: a budget would be passed; `retry_after` is the time
                until it renews (the next UTC day or month).
            LimitsStoreUnavailable: Redis does not answer.
        """
        moment = now or datetime.datetime.now(datetime.UTC)
        day_key, month_key = self._keys(tenant_id, moment.date())
        reservation = f"{_usage_prefix(tenant_id)}:reservation:{reservation_id}"
        allowed, which, _ = await self._reserve(
            keys=[day_key, month_key, reservation],
            args=[
                amount,
                -1 if daily is None else daily,
                -1 if monthly is None else monthly,
                RESERVATION_TTL_S,
            ],
        )
        if allowed:
            return
        if _text(which) == "day":
            assert daily is not None
            renews = datetime.datetime.combine(
                moment.date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC
            )
            message = f"The daily budget of {usd(daily):.2f} USD is spent."
        else:
            assert monthly is not None
            first = moment.date().replace(day=1) + datetime.timedelta(days=32)
            renews = datetime.datetime.combine(first.replace(day=1), datetime.time(), datetime.UTC)
            message = f"The monthly budget of {usd(monthly):.2f} USD is spent."
        raise QuotaExceeded(message, retry_after=(renews - moment).total_seconds())

    @_store_call
    async def settle(
        self,
        tenant_id: str,
        session_id: str,
        reservation_id: str,
        model: str,
        usage: common_pb2.Usage,
        cost: int,
        *,
        now: datetime.datetime | None = None,
    ) -> Spent:
        """Record a response's usage and cost, releasing its reservation.

        Returns:
            What the tenant has spent today and this month, after this response.
        """
        day_key, month_key = self._keys(tenant_id, _today(now))
        prefix = _usage_prefix(tenant_id)
        values = [
            1,
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens,
            cost,
            1 if usage.estimated else 0,
        ]
        day, month = await self._settle(
            keys=[
                day_key,
                month_key,
                f"{prefix}:session:{session_id}",
                f"{prefix}:reservation:{reservation_id}",
            ],
            args=[model, *values, DAY_TTL_S, SESSION_TTL_S],
        )
        return Spent(int(day), int(month))

    @_store_call
    async def spent(self, tenant_id: str, *, now: datetime.datetime | None = None) -> Spent:
        day_key, month_key = self._keys(tenant_id, _today(now))
        day = await self._redis.hget(day_key, "cost_pusd")
        month = await self._redis.hget(month_key, "cost_pusd")
        return Spent(int(day or 0), int(month or 0))

    @_store_call
    async def session(self, tenant_id: str, session_id: str) -> dict[str, int]:
        """A session's usage counters (empty when it has none)."""
        raw = await self._redis.hgetall(f"{_usage_prefix(tenant_id)}:session:{session_id}")
        return {_text(key): int(value) for key, value in raw.items()}

    @_store_call
    async def report(
        self, tenant_id: str, since: datetime.date, until: datetime.date
    ) -> list[UsageRow]:
        """Usage by day and model from `since` to `until` (UTC days, both included)."""
        rows = []
        day = since
        while day <= until:
            raw = await self._redis.hgetall(self._keys(tenant_id, day)[0])
            by_model: dict[str, dict[str, int]] = {}
            for key, value in raw.items():
                model, _, counter = _text(key).rpartition("|")
                if model and counter in COUNTERS:
                    by_model.setdefault(model, {})[counter] = int(value)
            for model in sorted(by_model):
                counts = by_model[model]
                rows.append(
                    UsageRow(day.isoformat(), model, *(counts.get(name, 0) for name in COUNTERS))
                )
            day += datetime.timedelta(days=1)
        return rows


# The longest window a report covers, in days.
MAX_REPORT_DAYS = 366


def report_window(
    since: str | None, until: str | None, today: datetime.date
) -> tuple[datetime.date, datetime.date]:
    """The UTC days a report covers: `since` (default: 30 days ago) to `until`
    (default: today), both YYYY-MM-DD, at most `MAX_REPORT_DAYS`.

    Raises:
        ValueError: a date that is not YYYY-MM-DD, an empty or too long window.
    """
    last = datetime.date.fromisoformat(until) if until else today
    first = datetime.date.fromisoformat(since) if since else last - datetime.timedelta(days=29)
    if first > last:
        raise ValueError("'since' is after 'until'")
    if (last - first).days >= MAX_REPORT_DAYS:
        raise ValueError(f"a report covers at most {MAX_REPORT_DAYS} days")
    return first, last


def _usage_prefix(tenant_id: str) -> str:
    return "sb:usage:" + _prefix(tenant_id).removeprefix("sb:limits:")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
