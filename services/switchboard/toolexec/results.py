"""Finished tool calls kept for idempotency: in process memory, or in Redis across replicas.

A call is identified by `(tenant_id, call_id)`. Before running a call the
servicer `claim`s it; the store answers with one of

- `StoredResult`: the call already ran; replay it.
- `Running`: another replica holds the claim and is running it; poll with
  `peek` until the result appears (or the claim disappears, and claim again).
- `Claimed`: this caller runs it, then `put`s the result (kept for the TTL)
  or, for a refusal that is not kept, `release`s the claim.

In Redis the claim is a "running" marker set with `SET NX` semantics (one Lua
script: read the key, or set the marker if it is absent) and a lease: the
tool's timeout plus a margin, so a replica that dies mid-call blocks retries
only until the lease ends. One key per call,

    sb:{<tenant_id>}:toolcall:<call_id>     string  "run:<token>:<fingerprint>"
                                                    or "done:<fingerprint>:<ExecuteResponse bytes>"

with the tenant id as the Redis Cluster hash tag. Ids outside
`[A-Za-z0-9_.-]{1,128}` are replaced by `~` + their SHA-256, so no id can
break out of its place in the key. A Redis failure raises
`ResultStoreUnavailable`; the servicer then refuses to run the call rather
than risk running a tool with side effects twice.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import redis.exceptions

from switchboard.errors import SwitchboardError
from switchboard.redis_client import AnyRedis
from switchboard.v1 import common_pb2

DEFAULT_MAX_STORED_RESULTS = 10_000
DEFAULT_RESULT_TTL_S = 24 * 3600
UNAVAILABLE_MESSAGE = "The tool call store is unavailable, so the call was not run; retry later."

_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_RUNNING = b"run"
_DONE = b"done"

# Read the call's key, or claim it with a "running" marker if it is absent:
# one round trip, and no other replica can claim in between.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then return value end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Delete the marker only if it is still ours: after a lease ran out, the key
# may be another replica's claim or result.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A finished call kept for idempotency.

    Attributes:
        fingerprint: digest of the tool name and arguments text of the call,
            so a reused call_id with a different call is refused, not replayed.
        response: the serialised `ExecuteResponse`.
    """

    fingerprint: str
    response: bytes


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller holds the claim and runs the call; `token` identifies the claim
    (in Redis, the marker value itself, so `release` removes only its own)."""

    token: str


@dataclass(frozen=True, slots=True)
class Running:
    """Another replica holds the claim; `fingerprint` is of the call it runs."""

    fingerprint: str


class ResultStoreUnavailable(SwitchboardError):
    """The store did not answer; nothing may run, as a duplicate could not be detected."""

    code = common_pb2.ERROR_CODE_TOOL_EXECUTION_FAILED


class ResultStore(Protocol):
    """Where calls are claimed and finished calls are kept, by (tenant_id, call_id).

    Every method raises `ResultStoreUnavailable` when the store cannot answer.
    """

    async def claim(
        self, tenant_id: str, call_id: str, fingerprint: str, *, lease_s: float
    ) -> StoredResult | Running | Claimed: ...

    async def peek(self, tenant_id: str, call_id: str) -> StoredResult | Running | None: ...

    async def put(self, tenant_id: str, call_id: str, result: StoredResult) -> None: ...

    async def release(self, tenant_id: str, call_id: str, claim: Claimed) -> None: ...


class MemoryResultStore:
    """A `ResultStore` in process memory, least recently used dropped first.

    One process sees every call it runs (the servicer deduplicates calls in
    flight itself), so claims always succeed and `Running` never occurs.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_STORED_RESULTS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], StoredResult] = OrderedDict()

    async def claim(
        self, tenant_id: str, call_id: str, fingerprint: str, *, lease_s: float
    ) -> StoredResult | Running | Claimed:
        stored = await self.peek(tenant_id, call_id)
        return stored if stored is not None else Claimed("")

    async def peek(self, tenant_id: str, call_id: str) -> StoredResult | Running | None:
        key = (tenant_id, call_id)
        result = self._entries.get(key)
        if result is not None:
            self._entries.move_to_end(key)
        return result

    async def put(self, tenant_id: str, call_id: str, result: StoredResult) -> None:
        self._entries[(tenant_id, call_id)] = result
        self._entries.move_to_end((tenant_id, call_id))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def release(self, tenant_id: str, call_id: str, claim: Claimed) -> None:
        return None

    def __len__(self) -> int:
        return len(self._entries)


class RedisResultStore:
    """A `ResultStore` in Redis, shared by every toolexec replica.

    Args:
        client: a bytes-returning client, e.g. from `switchboard.redis_client.any_client`;
            the caller owns and closes it.
        ttl_s: how long a finished call is kept for replays.
    """

    def __init__(self, client: AnyRedis, *, ttl_s: int = DEFAULT_RESULT_TTL_S) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self._redis = client
        self._ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    async def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(await self._redis.ping())
        except redis.exceptions.RedisError:
            return False

    async def claim(
        self, tenant_id: str, call_id: str, fingerprint: str, *, lease_s: float
    ) -> StoredResult | Running | Claimed:
        token = secrets.token_hex(8)
        marker = _marker(token, fingerprint)
        lease_ms = max(1, round(lease_s * 1000))
        value = await self._call(
            self._claim(keys=[result_key(tenant_id, call_id)], args=[marker, lease_ms])
        )
        if value is None:
            return Claimed(marker.decode())
        return _decode(value)

    async def peek(self, tenant_id: str, call_id: str) -> StoredResult | Running | None:
        value = await self._call(self._redis.get(result_key(tenant_id, call_id)))
        return None if value is None else _decode(value)

    async def put(self, tenant_id: str, call_id: str, result: StoredResult) -> None:
        value = b":".join((_DONE, result.fingerprint.encode(), result.response))
        await self._call(self._redis.set(result_key(tenant_id, call_id), value, ex=self._ttl_s))

    async def release(self, tenant_id: str, call_id: str, claim: Claimed) -> None:
        key = result_key(tenant_id, call_id)
        await self._call(self._release(keys=[key], args=[claim.token.encode()]))

    async def _call(self, pending: Any) -> Any:
        try:
            return await pending
        except redis.exceptions.RedisError as exc:
            raise ResultStoreUnavailable(UNAVAILABLE_MESSAGE) from exc


def result_key(tenant_id: str, call_id: str) -> str:
    """The Redis key of a call: `sb:{<tenant_id>}:toolcall:<call_id>`."""
    return f"sb:{{{_key_part(tenant_id)}}}:toolcall:{_key_part(call_id)}"


def _key_part(text: str) -> str:
    if _SAFE_ID.fullmatch(text):
        return text
    # "~" is outside the safe alphabet, so a hashed id never equals a plain one.
    return "~" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _marker(token: str, fingerprint: str) -> bytes:
    return b":".join((_RUNNING, token.encode(), fingerprint.encode()))


def _decode(value: bytes) -> StoredResult | Running:
    kind, _, rest = value.partition(b":")
    if kind == _DONE:
        fingerprint, _, response = rest.partition(b":")
        return StoredResult(fingerprint.decode(), response)
    if kind == _RUNNING:
        _token, _, fingerprint = rest.partition(b":")
        return Running(fingerprint.decode())
    # Not written by toolexec: refuse to guess whether the call ran.
    raise ResultStoreUnavailable(UNAVAILABLE_MESSAGE)
