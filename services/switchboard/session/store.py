"""Redis data access of the session service: sessions, their items and event logs.

All keys of a session share the hash tag `{<tenant_id>:<session_id>}` (one Redis
Cluster slot, so one Lua script or MULTI can touch them together); docs/session.md
details the layout:

    sb:{<tenant_id>:<session_id>}:meta    hash  tenant_id session_id config created_at_ms
                                                last_event_seq
    sb:{<tenant_id>:<session_id>}:items   hash  item id -> Item bytes
    sb:{<tenant_id>:<session_id>}:order   list  item ids, oldest first
    sb:{<tenant_id>:<session_id>}:events  zset  score seq, member "<seq>\\n<SessionEvent bytes>"

A session looked up under another tenant is simply absent. Each write is one Lua
script (or MULTI) that checks the session exists, changes it, and refreshes the
TTL of all four keys. A Redis outage surfaces as `SessionStoreUnavailable`.
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from switchboard.errors import (
    InvalidRequest,
    ItemNotFound,
    SessionNotFound,
    SessionStoreUnavailable,
)
from switchboard.v1 import common_pb2, session_pb2

ROOT_ITEM_ID = "root"
MAX_TENANT_ID_CHARS = 64
MAX_SESSION_ID_CHARS = 128
MAX_ITEM_ID_CHARS = 128
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_READ_LIMIT = 1000
MAX_READ_LIMIT = 10_000
UNAVAILABLE_MESSAGE = "The session store is unavailable."

# Tenant and session ids become part of Redis keys: no braces (hash tags), no
# colons (separators), no spaces or control characters.
_KEY_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")
# Failures that mean "Redis cannot serve right now" (down, restarting, loading its
# data set, a replica not yet promoted, out of memory), as opposed to a bug in a
# command.
_UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)

P = ParamSpec("P")
R = TypeVar("R")

# Every write script takes the TTL in ms as ARGV[1] and ends by calling touch().
_TOUCH = """
local function touch()
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
"""

# KEYS: meta items order events. ARGV: ttl_ms config.
# Returns the meta hash as a flat list, or nil when the session does not exist.
_UPDATE_CONFIG = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'config', ARGV[2])
touch()
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: meta items order events. ARGV: ttl_ms item_id item_bytes previous_item_id.
# previous_item_id: '' appends at the end, 'root' inserts first, else after that id.
# Returns {status, id of the item now before the new one ('' when first)}.
_APPEND_ITEM = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_session', ''} end
local id, previous = ARGV[2], ARGV[4]
if redis.call('HEXISTS', KEYS[2], id) == 1 then return {'duplicate', ''} end
local before = ''
if previous == '' then
  before = redis.call('LINDEX', KEYS[3], -1) or ''
  redis.call('RPUSH', KEYS[3], id)
elseif previous == 'root' then
  redis.call('LPUSH', KEYS[3], id)
else
  if redis.call('HEXISTS', KEYS[2], previous) == 0 then return {'no_previous', ''} end
  redis.call('LINSERT', KEYS[3], 'AFTER', previous, id)
  before = previous
end
redis.call('HSET', KEYS[2], id, ARGV[3])
touch()
return {'ok', before}
"""
)

# KEYS: meta items order events. ARGV: ttl_ms item_id. Returns a status.
_DELETE_ITEM = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_session' end
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then return 'no_item' end
redis.call('LREM', KEYS[3], 1, ARGV[2])
touch()
return 'ok'
"""
)

# KEYS: meta items order events. ARGV: ttl_ms max_events event_bytes...
# Numbers the events after the session's last seq, keeps the newest max_events,
# and returns the new last seq, or -1 when the session does not exist.
_APPEND_EVENTS = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last_event_seq') or '0')
for i = 3, #ARGV do
  seq = seq + 1
  local member = string.format('%d', seq) .. '\\n' .. ARGV[i]
  redis.call('ZADD', KEYS[4], seq, member)
end
redis.call('HSET', KEYS[1], 'last_event_seq', string.format('%d', seq))
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[2])
if excess > 0 then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1) end
touch()
return seq
"""
)


class SessionKeys(NamedTuple):
    """The Redis keys of one session, all in the same hash slot."""

    meta: str
    items: str
    order: str
    events: str


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code=common_pb2.ERROR_CODE_INVALID_VALUE, param=param)


def validate_key_id(value: str, param: str, max_chars: int) -> str:
    """Return `value` if it may become part of a Redis key, else raise.

    Raises:
        InvalidRequest: `missing_required_parameter` when empty, `invalid_value`
            when longer than `max_chars` or outside `[A-Za-z0-9_.-]`; `param` names it.
    """
    if not value:
        raise InvalidRequest(
            f"Missing required parameter: '{param}'.",
            code=common_pb2.ERROR_CODE_MISSING_REQUIRED_PARAMETER,
            param=param,
        )
    if len(value) > max_chars or not _KEY_SAFE_ID.fullmatch(value):
        raise _invalid(param, f"'{param}' must be 1 to {max_chars} characters from [A-Za-z0-9_.-].")
    return value


def session_keys(tenant_id: str, session_id: str) -> SessionKeys:
    """The keys of a session, after validating both ids (see `validate_key_id`)."""
    validate_key_id(tenant_id, "tenant_id", MAX_TENANT_ID_CHARS)
    validate_key_id(session_id, "session_id", MAX_SESSION_ID_CHARS)
    prefix = f"sb:{{{tenant_id}:{session_id}}}"
    return SessionKeys(f"{prefix}:meta", f"{prefix}:items", f"{prefix}:order", f"{prefix}:events")


def new_session_id() -> str:
    """An unguessable session id: `sess_` and 144 random bits, URL-safe."""
    return "sess_" + secrets.token_urlsafe(18)


def new_item_id() -> str:
    """A random item id: `item_` and 96 random bits, URL-safe."""
    return "item_" + secrets.token_urlsafe(12)


def redis_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> Redis:
    """A redis.asyncio client for the store that fails fast when Redis is away.

    Connect and read timeouts are `timeout_s`. Commands are not retried (a retried
    script could apply a write twice); the pool instead replaces connections that a
    restarted Redis closed before handing them out. Callers beyond
    `max_connections` wait up to `timeout_s` for one. Close it with `aclose()`.

    Raises:
        ValueError: the URL cannot be parsed.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        # Left on ("auto"), redis-py skips its check for connections a restarted
        # server closed, and the first command on each fails. Maintenance
        # notifications are a managed-Redis feature Switchboard does not use.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return Redis.from_pool(pool)


def _store_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn a Redis outage inside `method` into `SessionStoreUnavailable`."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE_ERRORS as exc:
            raise SessionStoreUnavailable(UNAVAILABLE_MESSAGE, retry_after=1.0) from exc

    return call


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A hash from HGETALL as a script returns it: a flat key, value, ... list."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class SessionStore:
    """Sessions, items and event logs of all tenants, in one Redis.

    Every method validates the tenant and session ids first (raising
    `InvalidRequest`), raises `SessionNotFound` for a session that does not exist
    under that tenant, and `SessionStoreUnavailable` when Redis does not answer.
    """

    def __init__(
        self,
        client: Redis,
        *,
        ttl_s: int,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args:
        client: a client from `redis_client()`; the caller owns and closes it.
        ttl_s: an idle session and all its keys expire this long after the last write.
        max_events: the event log of a session keeps at most this many newest events.
        clock: wall-clock seconds, for timestamps.
        """
        self._redis = client
        self._ttl_ms = ttl_s * 1000
        self._max_events = max_events
        self._clock = clock
        self._update_config = client.register_script(_UPDATE_CONFIG)
        self._append_item = client.register_script(_APPEND_ITEM)
        self._delete_item = client.register_script(_DELETE_ITEM)
        self._append_events = client.register_script(_APPEND_EVENTS)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _session(self, meta: dict[bytes, bytes], pttl_ms: int) -> session_pb2.Session:
        session = session_pb2.Session(
            id=_text(meta[b"session_id"]),
            tenant_id=_text(meta[b"tenant_id"]),
            created_at_ms=int(meta[b"created_at_ms"]),
            expires_at_ms=self._now_ms() + max(pttl_ms, 0),
            last_event_seq=int(meta.get(b"last_event_seq", b"0")),
        )
        session.config.ParseFromString(meta.get(b"config", b""))
        return session

    async def ping(self) -> bool:
        """True when Redis answers; never raises (the gRPC readiness probe)."""
        try:
            return bool(await self._redis.ping())
        except redis.exceptions.RedisError:
            return False

    @_store_call
    async def create_session(
        self, tenant_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        """Create a session with a fresh unguessable id under `tenant_id`."""
        session_id = new_session_id()
        keys = session_keys(tenant_id, session_id)
        created_at_ms = self._now_ms()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.meta,
                mapping={
                    "tenant_id": tenant_id,
                    "session_id": session_id,
                    "config": config.SerializeToString(),
                    "created_at_ms": created_at_ms,
                    "last_event_seq": 0,
                },
            )
            pipe.pexpire(keys.meta, self._ttl_ms)
            await pipe.execute()
        session = session_pb2.Session(
            id=session_id,
            tenant_id=tenant_id,
            created_at_ms=created_at_ms,
            expires_at_ms=created_at_ms + self._ttl_ms,
        )
        session.config.CopyFrom(config)
        return session

    @_store_call
    async def get_session(self, tenant_id: str, session_id: str) -> session_pb2.Session:
        """The session, with `expires_at_ms` from its remaining TTL."""
        keys = session_keys(tenant_id, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.meta)
            pipe.pttl(keys.meta)
            meta, pttl_ms = await pipe.execute()
        if not meta:
            raise SessionNotFound("Session not found.", param="session_id")
        return self._session(meta, pttl_ms)

    @_store_call
    async def update_session(
        self, tenant_id: str, session_id: str, config: session_pb2.SessionConfig
    ) -> session_pb2.Session:
        """Replace the session's config; returns the updated session."""
        keys = session_keys(tenant_id, session_id)
        flat = await self._update_config(
            keys=list(keys), args=[self._ttl_ms, config.SerializeToString()]
        )
        if flat is None:
            raise SessionNotFound("Session not found.", param="session_id")
        return self._session(_pairs(flat), self._ttl_ms)

    @_store_call
    async def delete_session(self, tenant_id: str, session_id: str) -> None:
        """Delete the session, its items and its event log."""
        keys = session_keys(tenant_id, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.meta)
            pipe.delete(*keys)
            existed, _ = await pipe.execute()
        if not existed:
            raise SessionNotFound("Session not found.", param="session_id")

    @_store_call
    async def append_item(
        self,
        tenant_id: str,
        session_id: str,
        item: common_pb2.Item,
        previous_item_id: str = "",
    ) -> tuple[common_pb2.Item, str]:
        """Insert `item` after `previous_item_id` ('' = at the end, 'root' = first).

        An empty `item.id` gets a fresh `item_...` id.

        Returns:
            The stored item and the id of the item now before it ('' when first).

        Raises:
            InvalidRequest: `item.id` is too long, is 'root', or already in the session.
            ItemNotFound: `previous_item_id` names no item of the session.
        """
        keys = session_keys(tenant_id, session_id)
        stored = common_pb2.Item()
        stored.CopyFrom(item)
        if not stored.id:
            stored.id = new_item_id()
        elif len(stored.id) > MAX_ITEM_ID_CHARS or stored.id == ROOT_ITEM_ID:
            raise _invalid(
                "item.id", f"'item.id' must be at most {MAX_ITEM_ID_CHARS} chars and not 'root'."
            )
        status, before = await self._append_item(
            keys=list(keys),
            args=[self._ttl_ms, stored.id, stored.SerializeToString(), previous_item_id],
        )
        match _text(status):
            case "ok":
                return stored, _text(before)
            case "no_session":
                raise SessionNotFound("Session not found.", param="session_id")
            case "duplicate":
                raise _invalid("item.id", f"Item with id '{stored.id}' already exists.")
            case "no_previous":
                raise ItemNotFound(
                    f"Previous item with id '{previous_item_id}' does not exist.",
                    param="previous_item_id",
                )
        raise AssertionError(f"unexpected append_item status {status!r}")

    @_store_call
    async def get_item(self, tenant_id: str, session_id: str, item_id: str) -> common_pb2.Item:
        """One item of the session. Raises `ItemNotFound` when it has no such item."""
        keys = session_keys(tenant_id, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.meta)
            pipe.hget(keys.items, item_id)
            exists, raw = await pipe.execute()
        if not exists:
            raise SessionNotFound("Session not found.", param="session_id")
        if raw is None:
            raise ItemNotFound(f"Item with id '{item_id}' does not exist.", param="item_id")
        return common_pb2.Item.FromString(raw)

    @_store_call
    async def delete_item(self, tenant_id: str, session_id: str, item_id: str) -> None:
        """Remove one item. Raises `ItemNotFound` when the session has no such item."""
        keys = session_keys(tenant_id, session_id)
        status = _text(await self._delete_item(keys=list(keys), args=[self._ttl_ms, item_id]))
        if status == "no_session":
            raise SessionNotFound("Session not found.", param="session_id")
        if status == "no_item":
            raise ItemNotFound(f"Item with id '{item_id}' does not exist.", param="item_id")

    @_store_call
    async def list_items(self, tenant_id: str, session_id: str) -> list[common_pb2.Item]:
        """All items of the session, in conversation order (oldest first)."""
        _, items = await self.load_conversation(tenant_id, session_id)
        return items

    @_store_call
    async def load_conversation(
        self, tenant_id: str, session_id: str
    ) -> tuple[session_pb2.Session, list[common_pb2.Item]]:
        """The session and all its items in order, read in one consistent snapshot."""
        keys = session_keys(tenant_id, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.meta)
            pipe.pttl(keys.meta)
            pipe.lrange(keys.order, 0, -1)
            pipe.hgetall(keys.items)
            meta, pttl_ms, order, stored = await pipe.execute()
        if not meta:
            raise SessionNotFound("Session not found.", param="session_id")
        items = [common_pb2.Item.FromString(stored[i]) for i in order if i in stored]
        return self._session(meta, pttl_ms), items

    @_store_call
    async def append_events(
        self, tenant_id: str, session_id: str, events: Sequence[session_pb2.SessionEvent]
    ) -> int:
        """Append events to the session's log, numbering them after the last seq.

        Client-provided `seq` values are ignored. The log keeps the newest
        `max_events` events. Returns the seq of the last event (the previous last
        seq when `events` is empty).
        """
        keys = session_keys(tenant_id, session_id)
        encoded = [
            session_pb2.SessionEvent(event_id=e.event_id, payload=e.payload).SerializeToString()
            for e in events
        ]
        last_seq = await self._append_events(
            keys=list(keys), args=[self._ttl_ms, self._max_events, *encoded]
        )
        if last_seq < 0:
            raise SessionNotFound("Session not found.", param="session_id")
        return int(last_seq)

    @_store_call
    async def read_events(
        self, tenant_id: str, session_id: str, after_seq: int = 0, limit: int = 0
    ) -> tuple[list[session_pb2.SessionEvent], int]:
        """Events with seq > `after_seq`, oldest first, at most `limit` of them.

        `limit` <= 0 means `DEFAULT_READ_LIMIT`; it is capped at `MAX_READ_LIMIT`.
        Events older than the log's retention are gone: the first returned seq
        may then be greater than `after_seq + 1`.

        Returns:
            The events and the session's last seq (0 when it has none).
        """
        keys = session_keys(tenant_id, session_id)
        count = min(limit, MAX_READ_LIMIT) if limit > 0 else DEFAULT_READ_LIMIT
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.meta)
            pipe.hget(keys.meta, "last_event_seq")
            pipe.zrangebyscore(keys.events, f"({max(after_seq, 0)}", "+inf", start=0, num=count)
            exists, last_seq, members = await pipe.execute()
        if not exists:
            raise SessionNotFound("Session not found.", param="session_id")
        events = []
        for member in members:
            seq, _, encoded = member.partition(b"\n")
            event = session_pb2.SessionEvent.FromString(encoded)
            event.seq = int(seq)
            events.append(event)
        return events, int(last_seq or 0)
