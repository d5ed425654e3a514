"""Redis data access of the session service: sessions, their items and event logs.

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

A session looked up under another tenant is simply absent. Each write is one Lua
script (or MULTI) that checks the session exists, changes it, and refreshes the
TTL of all four keys. A Redis outage surfaces as `SessionStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from switchboard.errors import (
    ItemNotFound,
    SessionNotFound,
    SessionStoreUnavailable,
    SessionTakenOver,
    SwitchboardError,
    invalid_value,
)
from switchboard.redis_client import AnyRedis, translate_outage
from switchboard.session import scripts
from switchboard.session.keys import (
    MAX_ITEM_ID_CHARS,
    ROOT_ITEM_ID,
    lease_keys,
    new_item_id,
    new_session_id,
    session_keys,
)
from switchboard.v1 import common_pb2, session_pb2

DEFAULT_MAX_EVENTS = 10_000
# How long a session's writer lease lasts unless renewed (appends renew it).
DEFAULT_LEASE_MS = 10_000


def lease_ms_within(requested: int) -> int:
    """A writer lease between 100 ms and 5 minutes; the default when not given."""
    return min(max(requested, 100), 300_000) if requested > 0 else DEFAULT_LEASE_MS


DEFAULT_READ_LIMIT = 1000
MAX_READ_LIMIT = 10_000
UNAVAILABLE_MESSAGE = "The session store is unavailable."

_store_call = translate_outage(
    lambda: SessionStoreUnavailable(UNAVAILABLE_MESSAGE, retry_after=1.0)
)


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
        self._max_events = max_events
        self._clock = clock
        self._update_config = client.register_script(scripts.UPDATE_CONFIG)
        self._append_item = client.register_script(scripts.APPEND_ITEM)
        self._delete_item = client.register_script(scripts.DELETE_ITEM)
        self._append_events = client.register_script(scripts.APPEND_EVENTS)
        self._claim_session = client.register_script(scripts.CLAIM_SESSION)
        self._release_session = client.register_script(scripts.RELEASE_SESSION)

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
            pipe.delete(*keys, *lease_keys(tenant_id, session_id))
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
            raise invalid_value(
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
                raise invalid_value("item.id", f"Item with id '{stored.id}' already exists.")
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
        self,
        tenant_id: str,
        session_id: str,
        events: Sequence[session_pb2.SessionEvent],
        *,
        holder: str = "",
        lease_ms: int = 0,
        open_response_id: str | None = None,
        open_response_seq: int = 0,
        broker: tuple[str, str] | None = None,
    ) -> int:
        """Append events to the session's log and return the seq of the last one
        (the previous last seq when `events` is empty).

        An event with seq 0 is numbered after the last; others keep their seq,
        which must be increasing and above the log's last (`invalid_value`
        otherwise, and nothing is written). With a `holder`, the append is refused
        with `SessionTakenOver` unless the writer lease is free or the holder's,
        and renews it for `lease_ms`. `open_response_id`, when not None, becomes
        the session's response in progress, opened at `open_response_seq`.
        `broker` (response id, HOST:PORT) notes the broker running a response;
        `get_session` reports it while that response is the open one. The log
        keeps the newest `max_events`.
        """
        request = session_pb2.AppendEventsRequest(
            tenant_id=tenant_id,
            session_id=session_id,
            events=events,
            holder=holder,
            lease_ms=lease_ms,
            open_response_seq=open_response_seq,
        )
        if open_response_id is not None:
            request.open_response_id = open_response_id
        if broker is not None:
            request.broker_response_id, request.broker_address = broker
        return await self.append(request)

    @_store_call
    async def append(self, request: session_pb2.AppendEventsRequest) -> int:
        """`append_events`, as the AppendEvents RPC asks for it."""
        keys, args = self._append_call(request)
        return _appended(int(await self._append_events(keys=keys, args=args)))

    @_store_call
    async def append_events_batch(
        self, appends: Sequence[session_pb2.AppendEventsRequest]
    ) -> list[int | SwitchboardError]:
        """Several appends (of different sessions), each as `append_events` does it,
        in one Redis round trip (on a cluster, one per append, concurrently).

        Returns:
            Per append, its last seq or the error it got.
        """
        calls: list[tuple[list[str], list[int | str | bytes]] | SwitchboardError] = []
        for a in appends:
            try:
                calls.append(self._append_call(a))
            except SwitchboardError as error:
                calls.append(error)
        queued = [call for call in calls if not isinstance(call, SwitchboardError)]
        if isinstance(self._redis, RedisCluster):
            replies = await asyncio.gather(
                *(self._append_events(keys=keys, args=args) for keys, args in queued)
            )
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in queued:
                    await self._append_events(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        results: list[int | SwitchboardError] = []
        answers = iter(replies)
        for call in calls:
            if isinstance(call, SwitchboardError):
                results.append(call)
                continue
            try:
                results.append(_appended(int(next(answers))))
            except SwitchboardError as error:
                results.append(error)
        return results

    def _append_call(
        self, request: session_pb2.AppendEventsRequest
    ) -> tuple[list[str], list[int | str | bytes]]:
        """The KEYS and ARGV of APPEND_EVENTS (ids validated first)."""
        tenant_id, session_id = request.tenant_id, request.session_id
        keys = session_keys(tenant_id, session_id)
        has_open = request.HasField("open_response_id")
        args: list[int | str | bytes] = [
            self._ttl_ms,
            self._max_events,
            request.holder,
            lease_ms_within(request.lease_ms),
            request.open_response_id if has_open else "-",
            request.open_response_seq if has_open else 0,
            request.broker_response_id,
            request.broker_address,
        ]
        for e in request.events:
            args.append(e.seq)
            args.append(
                session_pb2.SessionEvent(event_id=e.event_id, payload=e.payload).SerializeToString()
            )
        return [*keys, lease_keys(tenant_id, session_id).owner], args

    @_store_call
    async def claim_session(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse:
        """Take or renew the session's writer lease for `holder`; see CLAIM_SESSION."""
        keys = session_keys(tenant_id, session_id)
        lease = lease_keys(tenant_id, session_id)
        lease_ms = lease_ms_within(lease_ms)
        claimed, handoff, last_seq = await self._claim_session(
            keys=[keys.meta, lease.owner, lease.wanted], args=[holder, lease_ms]
        )
        if int(claimed) < 0:
            raise SessionNotFound("Session not found.", param="session_id")
        return session_pb2.ClaimSessionResponse(
            claimed=bool(claimed), handoff_requested=bool(handoff), last_event_seq=int(last_seq)
        )

    @_store_call
    async def release_session(self, tenant_id: str, session_id: str, holder: str) -> None:
        """Free the writer lease if `holder` has it."""
        await self._release_session(keys=[lease_keys(tenant_id, session_id).owner], args=[holder])

    @_store_call
    async def read_events(
        self, tenant_id: str, session_id: str, after_seq: int = 0, limit: int = 0
    ) -> tuple[list[session_pb2.SessionEvent], int, int]:
        """Events with seq > `after_seq`, oldest first, at most `limit` of them.

        `limit` <= 0 means `DEFAULT_READ_LIMIT`; it is capped at `MAX_READ_LIMIT`.
        Events older than the log's retention are gone: the first returned seq
        may then be greater than `after_seq + 1`.

        Returns:
            The events, the session's last seq (0 when it has none) and the seq
            up to which events were dropped from the log (0 when none were).
        """
        keys = session_keys(tenant_id, session_id)
        count = min(limit, MAX_READ_LIMIT) if limit > 0 else DEFAULT_READ_LIMIT
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.meta)
            pipe.hmget(keys.meta, ["last_event_seq", "trimmed_seq"])
            pipe.zrangebyscore(keys.events, f"({max(after_seq, 0)}", "+inf", start=0, num=count)
            exists, (last_seq, trimmed_seq), members = await pipe.execute()
        if not exists:
            raise SessionNotFound("Session not found.", param="session_id")
        events = []
        for member in members:
            seq, _, encoded = member.partition(b"\n")
            event = session_pb2.SessionEvent.FromString(encoded)
            event.seq = int(seq)
            events.append(event)
        return events, int(last_seq or 0), int(float(trimmed_seq or 0))


def _appended(last_seq: int) -> int:
    """The reply of APPEND_EVENTS: the last seq, or the error its code stands for."""
    if last_seq == -1:
        raise SessionNotFound("Session not found.", param="session_id")
    if last_seq == -2:
        raise SessionTakenOver("Another connection resumed this session.")
    if last_seq == -3:
        raise invalid_value("events.seq", "Event seqs must increase and follow the log's last seq.")
    return last_seq
