"""The event log of every session, and the writer lease that guards it.

A session's log (`sb:{<tenant_id>:<session_id>}:events`, a sorted set scored by
seq; docs/session.md) holds the server events the gateway sent, so a client
that reconnects resumes from the last event it saw. One connection at a time
writes a session's log: it holds the session's writer lease
(`...:owner`, expiring unless renewed; a claimant waiting for it is in
`...:wanted`). Appends arrive in batches, run by one Lua script (up to
`APPENDS_PER_SCRIPT` appends a run) that, for each append on its own, checks
the session, the lease and the seqs, writes, and refreshes the session's TTL.

`EventLog` is built by `SessionStore` (as its `events`) on the same Redis
client and TTL; a Redis outage surfaces as `SessionStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from switchboard.errors import (
    SessionNotFound,
    SessionTakenOver,
    SwitchboardError,
    invalid_value,
    missing_parameter,
)
from switchboard.redis_client import AnyRedis
from switchboard.session import scripts
from switchboard.session.keys import lease_keys, lease_keys_of, session_keys
from switchboard.session.outage import store_call
from switchboard.v1 import session_pb2

T = TypeVar("T")
# The KEYS and ARGV of one run of a script.
ScriptCall = tuple[list[str], list[int | str | bytes]]

DEFAULT_MAX_EVENTS = 10_000
# How long a session's writer lease lasts unless renewed (appends renew it).
DEFAULT_LEASE_MS = 10_000
DEFAULT_READ_LIMIT = 1000
MAX_READ_LIMIT = 10_000
# Appends per run of APPEND_EVENTS (a batch of more runs the script several
# times, in one pipeline): a run blocks Redis for some 10-20 µs per append.
APPENDS_PER_SCRIPT = 64
# The sessions whose keys `EventLog` keeps built (all are dropped when full).
KEYS_CACHED = 10_000


def lease_ms_within(requested: int) -> int:
    """A writer lease between 100 ms and 5 minutes; the default when not given."""
    return min(max(requested, 100), 300_000) if requested > 0 else DEFAULT_LEASE_MS


class EventLog:
    """The event logs and writer leases of all sessions, in one Redis.

    Every method validates the tenant and session ids first (raising
    `InvalidRequest`) and raises `SessionNotFound` for a session that does not
    exist under that tenant (`append_batch` answers it per append).
    """

    def __init__(self, client: AnyRedis, *, ttl_ms: int, max_events: int) -> None:
        """Args:
        client: the session store's Redis client (its owner closes it).
        ttl_ms: an append refreshes the session's keys to this TTL.
        max_events: a session's log keeps at most this many newest events.
        """
        self._redis = client
        self._ttl_ms = ttl_ms
        self._max_events = max_events
        self._append = client.register_script(scripts.APPEND_EVENTS)
        self._claim = client.register_script(scripts.CLAIM_SESSION)
        self._claims = client.register_script(scripts.CLAIM_SESSIONS)
        self._release = client.register_script(scripts.RELEASE_SESSION)
        # (tenant_id, session_id) -> the keys of `_append_call`.
        self._keys: dict[tuple[str, str], list[str]] = {}

    @store_call
    async def append_batch(
        self, appends: Sequence[session_pb2.AppendEventsRequest]
    ) -> list[int | SwitchboardError]:
        """Several appends (of different sessions), each applied atomically on its own,
        one script run for up to `APPENDS_PER_SCRIPT` of them, in one Redis round
        trip (on a cluster, one run per append, concurrently).

        An event with seq 0 is numbered after the log's last; others keep their
        seq, which must be increasing and above the log's last (`invalid_value`
        otherwise, and nothing of that append is written). With a `holder`, an
        append is refused with `SessionTakenOver` unless the writer lease is free
        or the holder's, and renews it for `lease_ms`. `open_response_id`, when
        set, becomes the session's response in progress, opened at
        `open_response_seq`. `broker_response_id` and `broker_address` note the
        broker running a response; `SessionStore.get_session` reports it while
        that response is the open one. The log keeps the newest `max_events`.

        Returns:
            Per append, the seq of its last event (the log's last seq when it has
            no events), or the error it got.
        """
        calls: list[ScriptCall | SwitchboardError] = []
        for a in appends:
            try:
                calls.append(self._append_call(a))
            except SwitchboardError as error:
                calls.append(error)
        return await self._run_each(
            self._append, calls, lambda reply: _appended(int(reply)), runs=self._appends_run
        )

    def _appends_run(self, calls: Sequence[ScriptCall]) -> ScriptCall:
        """One run of APPEND_EVENTS for the appends of `calls`."""
        return _merged(calls, [self._ttl_ms, self._max_events])

    async def _run_each(
        self,
        script: AsyncScript,
        calls: Sequence[ScriptCall | SwitchboardError],
        answer: Callable[[Any], T],
        runs: Callable[[Sequence[ScriptCall]], ScriptCall] | None = None,
        width: int = 1,
    ) -> list[T | SwitchboardError]:
        """Run `script` for each of `calls` (its KEYS and ARGV, or the error that
        call already got) in one Redis round trip (on a cluster, one per call,
        concurrently), and turn each reply into its `answer` (or the
        `SwitchboardError` that raises). With `runs`, the script takes up to
        `APPENDS_PER_SCRIPT` calls a run (`runs` makes a run of them; on a
        cluster, one) and replies a flat list, `width` values per call (one
        value: the call's reply; more: a list of them). A Redis error other
        than NOSCRIPT is raised."""
        queued = [call for call in calls if not isinstance(call, SwitchboardError)]
        if runs is None:
            replies = iter(await self._run_all(script, queued))
        else:
            per_run = 1 if isinstance(self._redis, RedisCluster) else APPENDS_PER_SCRIPT
            batched = [runs(queued[n : n + per_run]) for n in range(0, len(queued), per_run)]
            flat = [one for run in await self._run_all(script, batched) for one in run]
            grouped = (
                flat if width == 1 else [flat[n : n + width] for n in range(0, len(flat), width)]
            )
            replies = iter(grouped)
        results: list[T | SwitchboardError] = []
        for call in calls:
            if isinstance(call, SwitchboardError):
                results.append(call)
                continue
            try:
                results.append(answer(next(replies)))
            except SwitchboardError as error:
                results.append(error)
        return results

    async def _run_all(self, script: AsyncScript, calls: list[ScriptCall]) -> list[Any]:
        """The replies of `script` run for each of `calls`, in order."""
        if not calls:
            return []
        if isinstance(self._redis, RedisCluster):
            return list(
                await asyncio.gather(*(script(keys=keys, args=args) for keys, args in calls))
            )
        if len(calls) == 1:
            # The Script: EVALSHA, and on NOSCRIPT (nothing ran) loads it and runs it.
            [(keys, args)] = calls
            return [await script(keys=keys, args=args)]
        # EVALSHA itself, not the Script in the pipeline: redis-py would ask
        # SCRIPT EXISTS before every batch (a tenth of this service's time
        # under load). A Redis that lost its scripts (a restart) answers
        # NOSCRIPT to those calls, and nothing of them ran: they go again,
        # each through the Script, which loads it.
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for n, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                keys, args = calls[n]
                replies[n] = await script(keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def _append_call(self, request: session_pb2.AppendEventsRequest) -> ScriptCall:
        """The KEYS and ARGV of one append in APPEND_EVENTS (ids validated first)."""
        has_open = request.HasField("open_response_id")
        args: list[int | str | bytes] = [
            request.holder,
            lease_ms_within(request.lease_ms),
            request.open_response_id if has_open else "-",
            request.open_response_seq if has_open else 0,
            request.broker_response_id,
            request.broker_address,
            1 if request.release_lease else 0,
            len(request.events),
        ]
        for e in request.events:
            # The event as it came, seq and all: a reader takes the seq from the
            # member's prefix (the one the script gave it).
            args += (e.seq, e.SerializeToString())
        return self._append_keys(request.tenant_id, request.session_id), args

    def _append_keys(self, tenant_id: str, session_id: str) -> list[str]:
        """A session's keys as APPEND_EVENTS takes them, built (and the ids
        validated) once while the session keeps appending."""
        keys = self._keys.get((tenant_id, session_id))
        if keys is None:
            session = session_keys(tenant_id, session_id)
            keys = [*session, lease_keys_of(session).owner]
            if len(self._keys) >= KEYS_CACHED:
                self._keys.clear()
            self._keys[(tenant_id, session_id)] = keys
        return keys

    @store_call
    async def claim(
        self, tenant_id: str, session_id: str, holder: str, lease_ms: int
    ) -> session_pb2.ClaimSessionResponse:
        """Take or renew the session's writer lease for `holder`; see CLAIM_SESSION."""
        keys, args = _claim_call(tenant_id, session_id, holder, lease_ms)
        return _claimed(await self._claim(keys=keys, args=args))

    @store_call
    async def claim_batch(
        self, claims: Sequence[session_pb2.ClaimSessionRequest]
    ) -> list[session_pb2.ClaimSessionResponse | SwitchboardError]:
        """Several claims (of different sessions), each applied on its own as `claim`,
        in one Redis round trip (on a cluster, one per claim, concurrently).

        Returns:
            Per claim, in order, its answer or the error it got (a claim without
            a holder: `missing_required_parameter`).
        """
        calls: list[ScriptCall | SwitchboardError] = []
        for c in claims:
            try:
                if not c.holder:
                    raise missing_parameter("holder")
                calls.append(_claim_call(c.tenant_id, c.session_id, c.holder, c.lease_ms))
            except SwitchboardError as error:
                calls.append(error)
        return await self._run_each(
            self._claims, calls, _claimed, runs=lambda calls: _merged(calls, []), width=3
        )

    @store_call
    async def release(self, tenant_id: str, session_id: str, holder: str) -> None:
        """Free the writer lease if `holder` has it."""
        await self._release(keys=[lease_keys(tenant_id, session_id).owner], args=[holder])

    @store_call
    async def read(
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


def _claim_call(tenant_id: str, session_id: str, holder: str, lease_ms: int) -> ScriptCall:
    """The KEYS and ARGV of CLAIM_SESSION (ids validated first)."""
    keys = session_keys(tenant_id, session_id)
    lease = lease_keys_of(keys)
    return [keys.meta, lease.owner, lease.wanted], [holder, lease_ms_within(lease_ms)]


def _merged(calls: Sequence[ScriptCall], args: list[int | str | bytes]) -> ScriptCall:
    """One run of a script for several `calls`: their KEYS, and `args` then their ARGV."""
    keys: list[str] = []
    for call_keys, call_args in calls:
        keys += call_keys
        args += call_args
    return keys, args


def _claimed(reply: Sequence[int]) -> session_pb2.ClaimSessionResponse:
    """The reply of CLAIM_SESSION, or `SessionNotFound`."""
    claimed, handoff, last_seq = reply
    if int(claimed) < 0:
        raise SessionNotFound("Session not found.", param="session_id")
    return session_pb2.ClaimSessionResponse(
        claimed=bool(claimed), handoff_requested=bool(handoff), last_event_seq=int(last_seq)
    )


def _appended(last_seq: int) -> int:
    """The reply of APPEND_EVENTS: the last seq, or the error its code stands for."""
    if last_seq == -1:
        raise SessionNotFound("Session not found.", param="session_id")
    if last_seq == -2:
        raise SessionTakenOver("Another connection resumed this session.")
    if last_seq == -3:
        raise invalid_value("events.seq", "Event seqs must increase and follow the log's last seq.")
    return last_seq
