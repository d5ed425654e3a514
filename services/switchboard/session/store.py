"""Redis data access of the session service: sessions and their items, and the event log.

All keys of a session share the hash tag `{<tenant_id>:<session_id>}` (one Redis
Cluster slot, so one Lua script or MULTI can touch them together); docs/session.md
details the layout:

    sb:{<tenant_id>:<session_id>}:meta    hash  tenant_id session_id config created_at_ms
                                                last_event_seq
    sb:{<tenant_id>:<session_id>}:items   hash  item id -> Item bytes
    sb:{<tenant_id>:<session_id>}:order   list  item ids, oldest first
    sb:{<tenant_id>:<session_id>}:events  zset  score seq, member "<seq>\\n<SessionEvent bytes>"
    sb:{<tenant_id>:<session_id>}:owner   string  holder of the writer lease (expires with it)
    sb:{<tenant_id>:<session_id>}:wanted  string  a holder waiting for the lease

`SessionStore` reads and writes sessions and items; its `events`
(`switchboard.session.events.EventLog`) the event logs and writer leases.

A session looked up under another tenant is simply absent. Each write is one Lua
script (or MULTI) that checks the session exists, changes it, and refreshes the
TTL of all four keys. A Redis outage surfaces as `SessionStoreUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis.exceptions

from switchboard.errors import ItemNotFound, SessionNotFound, invalid_value, quote
from switchboard.redis_client import AnyRedis
from switchboard.session import scripts
from switchboard.session.events import DEFAULT_MAX_EVENTS, EventLog
from switchboard.session.keys import (
    MAX_ITEM_ID_CHARS,
    ROOT_ITEM_ID,
    new_item_id,
    new_session_id,
    session_keys,
)
from switchboard.session.outage import store_call
from switchboard.v1 import common_pb2, session_pb2


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A hash from HGETALL as a script returns it: a flat key, value, ... list."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _new_item(item: common_pb2.Item) -> common_pb2.Item:
    """A copy of `item` to store, with a fresh `item_...` id when it has none.

    Raises:
        InvalidRequest: its id is too long or 'root'.
    """
    stored = common_pb2.Item()
    stored.CopyFrom(item)
    if not stored.id:
        stored.id = new_item_id()
    elif len(stored.id) > MAX_ITEM_ID_CHARS or stored.id == ROOT_ITEM_ID:
        raise invalid_value(
            "item.id", f"'item.id' must be at most {MAX_ITEM_ID_CHARS} chars and not 'root'."
        )
    return stored


def _check_appended(status: bytes | str, item_id: str, previous_item_id: str) -> None:
    """Raise what an append script's status other than 'ok' means."""
    match _text(status):
        case "ok":
            return
        case "no_session":
            raise SessionNotFound("Session not found.", param="session_id")
        case "duplicate":
            raise invalid_value("item.id", f"Item with id {quote(item_id)} already exists.")
        case "no_previous":
            raise ItemNotFound(
                f"Previous item with id {quote(previous_item_id)} does not exist.",
                param="previous_item_id",
            )
    raise AssertionError(f"unexpected append_item status {status!r}")


class SessionStore:
    """Sessions and items of all tenants, in one Redis; `events` holds their event logs.

    Every method validates the tenant and session ids first (raising
    `InvalidRequest`), raises `SessionNotFound` for a session that does not exist
    under that tenant, and `SessionStoreUnavailable` when Redis does not answer.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        ttl_s: int,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args:
        client: from `switchboard.redis_client.any_client()`; the caller owns and closes it.
        ttl_s: an idle session and all its keys expire this long after the last write.
        max_events: the event log of a session keeps at most this many newest events.
        clock: wall-clock seconds, for timestamps.
        """
        self._redis = client
        self._ttl_ms = ttl_s * 1000
        self._clock = clock
        self._update_config = client.register_script(scripts.UPDATE_CONFIG)
        self._append_item = client.register_script(scripts.APPEND_ITEM)
        self._append_item_and_load = client.register_script(scripts.APPEND_ITEM_AND_LOAD)
        self._delete_item = client.register_script(scripts.DELETE_ITEM)
        self.events = EventLog(client, ttl_ms=self._ttl_ms, max_events=max_events)

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
        open_response = _text(meta.get(b"open_response", b""))
        if open_response:
            session.open_response_id = open_response
            session.open_response_seq = int(meta.get(b"open_response_seq", b"0"))
            # The broker note may have been written before or after the response
            # opened, or be an earlier response's: it counts for this one only.
            if _text(meta.get(b"broker_response", b"")) == open_response:
                session.open_response_broker = _text(meta.get(b"broker", b""))
        session.config.ParseFromString(meta.get(b"config", b""))
        return session

    async def ping(self) -> bool:
        """True when Redis answers; never raises (the gRPC readiness probe)."""
        try:
            return bool(await self._redis.ping())
        except redis.exceptions.RedisError:
            return False

    @store_call
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

    @store_call
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

    @store_call
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

    @store_call
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
        stored = _new_item(item)
        status, before = await self._append_item(
            keys=list(session_keys(tenant_id, session_id)),
            args=[self._ttl_ms, stored.id, stored.SerializeToString(), previous_item_id],
        )
        _check_appended(status, stored.id, previous_item_id)
        return stored, _text(before)

    @store_call
    async def append_item_and_load(
        self,
        tenant_id: str,
        session_id: str,
        item: common_pb2.Item,
        previous_item_id: str = "",
    ) -> tuple[common_pb2.Item, str, session_pb2.Session, list[common_pb2.Item]]:
        """`append_item`, then what `load_conversation` reads, in one atomic script.

        Returns:
            The stored item, the id of the item now before it, the session and
            all its items in order.

        Raises:
            As `append_item`.
        """
        stored = _new_item(item)
        reply = await self._append_item_and_load(
            keys=list(session_keys(tenant_id, session_id)),
            args=[self._ttl_ms, stored.id, stored.SerializeToString(), previous_item_id],
        )
        _check_appended(reply[0], stored.id, previous_item_id)
        _, before, meta, pttl_ms, order, raw_items = reply
        by_id = _pairs(raw_items)
        items = [common_pb2.Item.FromString(by_id[i]) for i in order if i in by_id]
        return stored, _text(before), self._session(_pairs(meta), pttl_ms), items

    @store_call
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
            raise ItemNotFound(f"Item with id {quote(item_id)} does not exist.", param="item_id")
        return common_pb2.Item.FromString(raw)

    @store_call
    async def delete_item(self, tenant_id: str, session_id: str, item_id: str) -> None:
        """Remove one item. Raises `ItemNotFound` when the session has no such item."""
        keys = session_keys(tenant_id, session_id)
        status = _text(await self._delete_item(keys=list(keys), args=[self._ttl_ms, item_id]))
        if status == "no_session":
            raise SessionNotFound("Session not found.", param="session_id")
        if status == "no_item":
            raise ItemNotFound(f"Item with id {quote(item_id)} does not exist.", param="item_id")

    @store_call
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
