"""Per-tenant limits that hold across replicas: one atomic Lua script per decision.

The gateway and the broker run several replicas; each asks Redis, not its own
memory, whether a tenant may start a request, open a connection or spend
tokens. All keys of a tenant share the hash tag `{<tenant_id>}`, so on Redis
Cluster every script runs on the one node that owns the tenant:

    sb:limits:{<tenant>}:requests         zset  admission id -> admission ms
    sb:limits:{<tenant>}:slots:<kind>     zset  holder -> lease end ms
    sb:limits:{<tenant>}:tokens:minute    hash  second (ms // 1000) -> tokens
    sb:limits:{<tenant>}:tokens:day       hash  UTC day (ms // 86400000) -> tokens
    sb:limits:{<tenant>}:reservation:<id> hash  minute day tokens [settled]

docs/limits.md explains the algorithms, their precision and the failure
behaviour. A Redis outage raises `LimitsStoreUnavailable` (fail closed).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from switchboard.errors import invalid_value
from switchboard.limits import scripts
from switchboard.limits.decision import (
    INSUFFICIENT_QUOTA,
    RATE_LIMIT_EXCEEDED,
    UNLIMITED,
    Decision,
    LimitsStoreUnavailable,
    RateLimit,
    RateLimitState,
)
from switchboard.redis_client import translate_outage

UNAVAILABLE_MESSAGE = "The limits store is unavailable."
# A pending reservation may be settled up to this long after it was made (the
# day it was charged to is kept that long); a settled one is kept a short while
# so that a retried settle or reserve finds it.
RESERVATION_TTL_S = 2 * 86_400
SETTLED_TTL_S = 600

# Ids become part of Redis keys: no braces (hash tags), nothing unprintable.
_TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RESERVATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_KIND = re.compile(r"[a-z_]{1,32}")
MAX_HOLDER_CHARS = 256

_store_call = translate_outage(lambda: LimitsStoreUnavailable(UNAVAILABLE_MESSAGE, retry_after=1.0))


def _prefix(tenant_id: str) -> str:
    if not _TENANT_ID.fullmatch(tenant_id):
        raise invalid_value("tenant_id", "'tenant_id' must be 1 to 64 characters [A-Za-z0-9_.-].")
    return f"sb:limits:{{{tenant_id}}}"


def _slots_key(tenant_id: str, kind: str, holder: str) -> str:
    if not _KIND.fullmatch(kind):
        raise invalid_value("kind", "'kind' must be 1 to 32 characters [a-z_].")
    if not 0 < len(holder) <= MAX_HOLDER_CHARS:
        raise invalid_value("holder", f"'holder' must be 1 to {MAX_HOLDER_CHARS} characters.")
    return f"{_prefix(tenant_id)}:slots:{kind}"


def _token_keys(tenant_id: str, reservation_id: str) -> list[str]:
    prefix = _prefix(tenant_id)
    if not _RESERVATION_ID.fullmatch(reservation_id):
        raise invalid_value(
            "reservation_id", "'reservation_id' must be 1 to 128 characters [A-Za-z0-9_.:-]."
        )
    return [
        f"{prefix}:tokens:minute",
        f"{prefix}:tokens:day",
        f"{prefix}:reservation:{reservation_id}",
    ]


def _script_limit(name: str, value: int | None) -> int:
    """`value` for a script: -1 for None (unlimited); raises on a negative limit."""
    if value is None:
        return -1
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _seconds(ms: int) -> float:
    return max(ms, 0) / 1000


def _refused(limit: int, used: int, retry_ms: int, code: str) -> Decision:
    return Decision(False, limit, max(limit - used, 0), _seconds(retry_ms), code)


class LuaScript:
    """A Lua script run with EVALSHA, and with EVAL when the node lacks it.

    Not `register_script`: its NOSCRIPT fallback is a SCRIPT LOAD, which
    RedisCluster sends to every primary. After a restart or failover, every
    concurrent caller would then take a connection on every node at once,
    and a burst exhausts the pools (MaxConnectionsError). EVAL goes only to the
    node that owns the keys, runs the script, and caches it there.
    """

    def __init__(self, redis: Redis | RedisCluster, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: list[str], args: list[int | str]) -> Any:
        try:
            return await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self._redis.eval(self._source, len(keys), *keys, *args)


class TenantLimiter:
    """Requests, concurrency and token limits of all tenants, exact across replicas.

    Every method validates its ids first (raising `InvalidRequest` before any
    Redis call) and raises `LimitsStoreUnavailable` (code `service_unavailable`,
    retryable, `retry_after` 1 s) when Redis does not answer in the client's
    timeout: callers refuse the request rather than let it through unchecked.
    """

    def __init__(
        self, redis: Redis | RedisCluster, *, clock: Callable[[], float] = time.time
    ) -> None:
        """Args:
        redis: a standalone client (`switchboard.redis_client.redis_client`) or a
            `RedisCluster`; the caller owns and closes it. Its timeouts bound how
            long a call can wait.
        clock: Unix seconds (UTC). Its readings are the times the scripts use, so
            replicas' clocks must agree (NTP); tests pass a fake one.
        """
        self._redis = redis
        self._clock = clock
        self._admit = LuaScript(redis, scripts.ADMIT_REQUEST)
        self._acquire = LuaScript(redis, scripts.ACQUIRE)
        self._renew = LuaScript(redis, scripts.RENEW)
        self._reserve = LuaScript(redis, scripts.RESERVE_TOKENS)
        self._settle = LuaScript(redis, scripts.SETTLE_TOKENS)
        self._usage = LuaScript(redis, scripts.USAGE)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @_store_call
    async def admit_request(self, tenant_id: str, *, per_minute: int) -> Decision:
        """Count one request against `per_minute` requests per sliding 60 s window.

        Exact: across all replicas, no 60 s window ever holds more than
        `per_minute` admissions, and a request is refused only when the window
        ending now holds `per_minute` already. A refused request is not counted.

        Returns:
            The decision; when refused, `rate_limit_exceeded` with `retry_after_s`
            until the oldest admission leaves the window (60 s when
            `per_minute` is 0).
        """
        key = f"{_prefix(tenant_id)}:requests"
        limit = _script_limit("per_minute", per_minute)
        # A fresh member per call (128 random bits: two calls never share one);
        # a client-level retry of this call resends it (see scripts).
        member = secrets.token_hex(16)
        allowed, used, retry_ms = await self._admit(
            keys=[key], args=[self._now_ms(), limit, member]
        )
        if not allowed:
            return _refused(limit, used, retry_ms, RATE_LIMIT_EXCEEDED)
        return Decision(True, limit, max(limit - used, 0), 0.0, None)

    @_store_call
    async def acquire(
        self, tenant_id: str, kind: str, holder: str, *, limit: int, lease_s: float
    ) -> Decision:
        """Take one of `limit` concurrent slots of `kind` for `holder`.

        A slot is held for `lease_s` from the last acquire or renew, then frees
        itself, so slots of a crashed replica come back within one lease. A
        holder that already holds a slot keeps it (and its lease restarts):
        acquiring twice takes one slot.

        Args:
            kind: what is counted, e.g. `connections` or `responses` ([a-z_]).
            holder: a unique id of the thing holding the slot (a connection id).
            limit: slots the tenant may hold at once.
            lease_s: how long the slot lasts without `renew`; renew well before.

        Returns:
            The decision; when refused, `rate_limit_exceeded` with `retry_after_s`
            until the earliest lease ends (a release can free one sooner).
        """
        key = _slots_key(tenant_id, kind, holder)
        limit = _script_limit("limit", limit)
        allowed, held, retry_ms = await self._acquire(
            keys=[key], args=[self._now_ms(), limit, _lease_ms(lease_s), holder]
        )
        if not allowed:
            return _refused(limit, held, retry_ms, RATE_LIMIT_EXCEEDED)
        return Decision(True, limit, max(limit - held, 0), 0.0, None)

    @_store_call
    async def renew(self, tenant_id: str, kind: str, holder: str, *, lease_s: float) -> bool:
        """Extend `holder`'s slot to `lease_s` from now.

        Returns:
            True when extended; False when `holder` holds no live slot (released,
            never acquired, or its lease already ended and the slot may be
            someone else's): the holder must `acquire` again or stop.
        """
        key = _slots_key(tenant_id, kind, holder)
        renewed = await self._renew(keys=[key], args=[self._now_ms(), _lease_ms(lease_s), holder])
        return bool(renewed)

    @_store_call
    async def release(self, tenant_id: str, kind: str, holder: str) -> None:
        """Free `holder`'s slot of `kind` at once; a no-op when it holds none."""
        await self._redis.zrem(_slots_key(tenant_id, kind, holder), holder)

    @_store_call
    async def reserve_tokens(
        self,
        tenant_id: str,
        reservation_id: str,
        tokens: int,
        *,
        per_minute: int | None,
        per_day: int | None,
    ) -> Decision:
        """Reserve `tokens` before an upstream call (prompt estimate + max output).

        Granted only when the tokens used and still reserved plus `tokens` fit
        both limits; a granted reservation counts as used at once, in the minute
        and the UTC day of now, until `settle_tokens` replaces it by the real
        usage. Calling again with the same `reservation_id` charges nothing.

        Args:
            reservation_id: unique per upstream call ([A-Za-z0-9_.:-], up to 128).
            per_minute: tokens per sliding minute; None is unlimited.
            per_day: tokens per UTC day; None is unlimited.

        Returns:
            The decision. Refused by the day budget (checked first):
            `insufficient_quota`, `retry_after_s` until the UTC day ends. Refused
            by the minute limit: `rate_limit_exceeded`, `retry_after_s` until
            enough reserved tokens leave the window (until it is empty when
            `tokens` alone exceeds the limit, which then never fits). `limit` and
            `remaining` describe the refusing limit, or when granted the limit
            with the fewest tokens remaining.
        """
        keys = _token_keys(tenant_id, reservation_id)
        per_minute_arg = _script_limit("per_minute", per_minute)
        per_day_arg = _script_limit("per_day", per_day)
        amount = _script_limit("tokens", tokens)
        allowed, minute_used, day_used, retry_ms, refused_by = await self._reserve(
            keys=keys,
            args=[self._now_ms(), amount, per_minute_arg, per_day_arg, RESERVATION_TTL_S * 1000],
        )
        if refused_by == 2:
            return _refused(per_day_arg, day_used, retry_ms, INSUFFICIENT_QUOTA)
        if refused_by == 1:
            return _refused(per_minute_arg, minute_used, retry_ms, RATE_LIMIT_EXCEEDED)
        assert allowed
        tightest = min(
            (
                (limit - used, limit)
                for limit, used in ((per_minute, minute_used), (per_day, day_used))
                if limit is not None
            ),
            default=(UNLIMITED, UNLIMITED),
            key=lambda pair: pair[0],
        )
        return Decision(True, tightest[1], max(tightest[0], 0), 0.0, None)

    @_store_call
    async def settle_tokens(self, tenant_id: str, reservation_id: str, actual_tokens: int) -> None:
        """Replace a reservation by the tokens the call really used.

        Works from any replica. The difference goes to the minute and the day the
        reservation was charged to; if the reservation has left the minute window,
        tokens used beyond it are charged to the current minute instead (unused
        ones no longer hold anything back). Settling twice, or settling an unknown
        or expired reservation, changes nothing.
        """
        keys = _token_keys(tenant_id, reservation_id)
        actual = _script_limit("actual_tokens", actual_tokens)
        await self._settle(keys=keys, args=[self._now_ms(), actual, SETTLED_TTL_S * 1000])

    @_store_call
    async def usage(
        self,
        tenant_id: str,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ) -> RateLimitState:
        """The tenant's per-minute requests and tokens for `rate_limits.updated`.

        Reads only. A limit that is None is reported as `UNLIMITED` with
        `remaining` `UNLIMITED` and `reset_seconds` 0.0, so the event has numbers
        everywhere. Reserved tokens count as used.
        """
        prefix = _prefix(tenant_id)
        rpm = _script_limit("requests_per_minute", requests_per_minute)
        tpm = _script_limit("tokens_per_minute", tokens_per_minute)
        requests = tokens = requests_reset_ms = tokens_reset_ms = 0
        if rpm >= 0 or tpm >= 0:
            requests, requests_reset_ms, tokens, tokens_reset_ms = await self._usage(
                keys=[f"{prefix}:requests", f"{prefix}:tokens:minute"], args=[self._now_ms()]
            )
        return RateLimitState(
            requests=_rate_limit("requests", rpm, requests, requests_reset_ms),
            tokens=_rate_limit("tokens", tpm, tokens, tokens_reset_ms),
        )


def _lease_ms(lease_s: float) -> int:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s}")
    return max(int(lease_s * 1000), 1)


def _rate_limit(name: str, limit: int, used: int, reset_ms: int) -> RateLimit:
    if limit < 0:
        return RateLimit(name, UNLIMITED, UNLIMITED, 0.0)
    return RateLimit(name, limit, max(limit - used, 0), _seconds(reset_ms))
