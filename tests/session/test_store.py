"""SessionStore against a real redis-server: layout, atomicity, TTLs, event logs."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from switchboard.errors import (
    InvalidRequest,
    ItemNotFound,
    SessionNotFound,
    SessionStoreUnavailable,
    SessionTakenOver,
)
from switchboard.redis_client import redis_client
from switchboard.session.events import APPENDS_PER_SCRIPT
from switchboard.session.keys import session_keys
from switchboard.session.store import SessionStore
from switchboard.v1 import session_pb2
from tests.session.support import TTL_S, C, append_events, event, message
from tools.redis_server import RedisServer


async def item_ids(store: SessionStore, tenant: str, session_id: str) -> list[str]:
    _, items = await store.load_conversation(tenant, session_id)
    return [item.id for item in items]


async def test_create_get_update(store: SessionStore, tenant: str) -> None:
    config = session_pb2.SessionConfig(model="gpt-realtime", instructions="be brief")
    before_ms = int(time.time() * 1000)
    created = await store.create_session(tenant, config)
    assert created.id.startswith("sess_") and len(created.id) >= 24
    assert created.tenant_id == tenant
    assert created.config == config
    assert before_ms <= created.created_at_ms <= before_ms + 5000
    assert created.expires_at_ms == created.created_at_ms + TTL_S * 1000

    fetched = await store.get_session(tenant, created.id)
    assert fetched.config == config
    assert fetched.created_at_ms == created.created_at_ms
    assert abs(fetched.expires_at_ms - created.expires_at_ms) < 5000
    assert fetched.last_event_seq == 0

    new_config = session_pb2.SessionConfig(model="other", tool_choice="none")
    updated = await store.update_session(tenant, created.id, new_config)
    assert updated.config == new_config
    assert (await store.get_session(tenant, created.id)).config == new_config

    with pytest.raises(SessionNotFound):
        await store.get_session(tenant, "sess_missing")


async def test_session_ids_are_unique_and_unguessable(store: SessionStore, tenant: str) -> None:
    ids = {(await store.create_session(tenant, session_pb2.SessionConfig())).id for _ in range(20)}
    assert len(ids) == 20


async def test_all_keys_share_one_cluster_slot_and_are_tenant_scoped(
    store: SessionStore, client: Redis, tenant: str
) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    await store.append_item(tenant, session.id, message("m1"))
    await append_events(store, tenant, session.id, [event("e1")])
    keys = sorted(k.decode() for k in await client.keys(f"sb:{{{tenant}:*"))
    prefix = f"sb:{{{tenant}:{session.id}}}"
    assert keys == [f"{prefix}:events", f"{prefix}:items", f"{prefix}:meta", f"{prefix}:order"]
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_every_write_refreshes_the_ttl_of_every_key(
    store: SessionStore, client: Redis, tenant: str
) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    keys = session_keys(tenant, session.id)
    await store.append_item(tenant, session.id, message("m1"))
    await append_events(store, tenant, session.id, [event("e1")])
    writes = [
        lambda: store.append_item(tenant, session.id, message()),
        lambda: store.update_session(tenant, session.id, session_pb2.SessionConfig(model="m")),
        lambda: append_events(store, tenant, session.id, [event("e2")]),
        lambda: store.delete_item(tenant, session.id, "m1"),
    ]
    for write in writes:
        for key in keys:
            await client.pexpire(key, 5_000)
        await write()
        for key in keys:
            ttl_ms = await client.pttl(key)
            assert TTL_S * 1000 - 5_000 < ttl_ms <= TTL_S * 1000, key
    session_after = await store.get_session(tenant, session.id)
    assert session_after.expires_at_ms > int(time.time() * 1000) + (TTL_S - 5) * 1000


async def test_another_tenant_sees_nothing(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    await store.append_item(tenant, session.id, message("m1"))
    other = tenant + "-b"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get_session(other, session.id),
        lambda: store.update_session(other, session.id, session_pb2.SessionConfig()),
        lambda: store.append_item(other, session.id, message("m2")),
        lambda: store.get_item(other, session.id, "m1"),
        lambda: store.delete_item(other, session.id, "m1"),
        lambda: store.load_conversation(other, session.id),
        lambda: append_events(store, other, session.id, [event("e")]),
        lambda: store.events.read(other, session.id),
    ]
    for call in calls:
        with pytest.raises(SessionNotFound):
            await call()
    assert await item_ids(store, tenant, session.id) == ["m1"]


@pytest.mark.parametrize(
    ("tenant_id", "session_id", "code", "param"),
    [
        ("", "sess_x", C.ERROR_CODE_MISSING_REQUIRED_PARAMETER, "tenant_id"),
        ("a:b", "sess_x", C.ERROR_CODE_INVALID_VALUE, "tenant_id"),
        ("a}b", "sess_x", C.ERROR_CODE_INVALID_VALUE, "tenant_id"),
        ("x" * 65, "sess_x", C.ERROR_CODE_INVALID_VALUE, "tenant_id"),
        ("acme", "", C.ERROR_CODE_MISSING_REQUIRED_PARAMETER, "session_id"),
        ("acme", "sess x", C.ERROR_CODE_INVALID_VALUE, "session_id"),
        ("acme", "{sess}", C.ERROR_CODE_INVALID_VALUE, "session_id"),
        ("acme", "s" * 129, C.ERROR_CODE_INVALID_VALUE, "session_id"),
    ],
)
async def test_ids_are_validated_before_they_reach_a_key(
    store: SessionStore, tenant_id: str, session_id: str, code: int, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await store.get_session(tenant_id, session_id)
    assert (caught.value.code, caught.value.param) == (code, param)


async def test_append_orders_by_previous_item_id(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    sid = session.id
    assert (await store.append_item(tenant, sid, message("a")))[1] == ""
    assert (await store.append_item(tenant, sid, message("c")))[1] == "a"
    assert (await store.append_item(tenant, sid, message("b"), "a"))[1] == "a"
    assert (await store.append_item(tenant, sid, message("first"), "root"))[1] == ""
    assert (await store.append_item(tenant, sid, message("d"), ""))[1] == "c"
    assert await item_ids(store, tenant, sid) == ["first", "a", "b", "c", "d"]

    with pytest.raises(ItemNotFound) as caught:
        await store.append_item(tenant, sid, message("e"), "nope")
    assert caught.value.param == "previous_item_id"
    with pytest.raises(InvalidRequest) as duplicate:
        await store.append_item(tenant, sid, message("b"))
    assert (duplicate.value.code, duplicate.value.param) == (C.ERROR_CODE_INVALID_VALUE, "item.id")
    with pytest.raises(InvalidRequest):
        await store.append_item(tenant, sid, message("root"))
    assert await item_ids(store, tenant, sid) == ["first", "a", "b", "c", "d"]


async def test_item_without_id_gets_one_and_round_trips(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    original = message("", "hello there")
    stored, _ = await store.append_item(tenant, session.id, original)
    assert stored.id.startswith("item_")
    assert original.id == ""  # the caller's message is not modified
    fetched = await store.get_item(tenant, session.id, stored.id)
    assert fetched == stored
    assert fetched.content[0].text == "hello there"


async def test_get_and_delete_unknown_items(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    await store.append_item(tenant, session.id, message("a"))
    await store.append_item(tenant, session.id, message("b"))
    await store.delete_item(tenant, session.id, "a")
    assert await item_ids(store, tenant, session.id) == ["b"]
    with pytest.raises(ItemNotFound):
        await store.get_item(tenant, session.id, "a")
    with pytest.raises(ItemNotFound):
        await store.delete_item(tenant, session.id, "a")
    with pytest.raises(SessionNotFound):
        await store.get_item(tenant, "sess_missing", "b")


async def test_concurrent_appends_are_each_kept_once(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    await store.append_item(tenant, session.id, message("anchor"))
    results = await asyncio.gather(
        *(store.append_item(tenant, session.id, message(f"m{i}"), "anchor") for i in range(50))
    )
    ids = await item_ids(store, tenant, session.id)
    assert sorted(ids) == sorted(["anchor", *(f"m{i}" for i in range(50))])
    assert ids[0] == "anchor"
    assert all(previous == "anchor" for _, previous in results)


async def test_events_get_increasing_seq_from_one(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    sid = session.id
    assert await store.events.read(tenant, sid) == ([], 0, 0)
    assert await append_events(store, tenant, sid, [event("e1"), event("e2")]) == 2
    assert await append_events(store, tenant, sid, [event("e3")]) == 3
    assert await append_events(store, tenant, sid, []) == 3
    events, last, _ = await store.events.read(tenant, sid)
    assert [(e.seq, e.event_id) for e in events] == [(1, "e1"), (2, "e2"), (3, "e3")]
    assert events[0].payload == b'{"id":"e1"}'
    assert last == 3
    assert (await store.get_session(tenant, sid)).last_event_seq == 3


async def test_appends_go_on_after_redis_lost_its_scripts(
    store: SessionStore, client: Redis, tenant: str
) -> None:
    # As after a Redis restart: the batch's EVALSHA gets NOSCRIPT, and those
    # appends go again (once each, nothing of them having run).
    sid = (await store.create_session(tenant, session_pb2.SessionConfig())).id
    assert await append_events(store, tenant, sid, [event("e1")]) == 1
    await client.script_flush()
    assert await append_events(store, tenant, sid, [event("e2"), event("e3")]) == 3
    events, _, _ = await store.events.read(tenant, sid)
    assert [(e.seq, e.event_id) for e in events] == [(1, "e1"), (2, "e2"), (3, "e3")]


async def test_a_batch_of_several_script_runs_answers_each_append_on_its_own(
    store: SessionStore, client: Redis, tenant: str
) -> None:
    # More appends than one run of the script takes: several runs, in one
    # pipeline, after Redis lost its scripts (each run gets NOSCRIPT and goes
    # again, once). Refusals stay with their append, in any run.
    sids = [(await store.create_session(tenant, session_pb2.SessionConfig())).id for _ in range(3)]
    count = 2 * APPENDS_PER_SCRIPT + 5
    appends = [
        session_pb2.AppendEventsRequest(
            tenant_id=tenant, session_id=sids[n % 3], events=[event(f"e{n}")]
        )
        for n in range(count)
    ]
    refused = {
        7: session_pb2.SessionEvent(seq=1, event_id="stale", payload=b"{}"),  # not above the last
        APPENDS_PER_SCRIPT + 1: None,  # no such session
        count - 1: None,  # a malformed session id: refused before Redis
    }
    appends[7].events.append(refused[7])
    appends[APPENDS_PER_SCRIPT + 1].session_id = "sess_missing"
    appends[count - 1].session_id = "not/an/id"
    await client.script_flush()
    outcomes = await store.events.append_batch(appends)
    assert isinstance(outcomes[7], InvalidRequest) and outcomes[7].param == "events.seq"
    assert isinstance(outcomes[APPENDS_PER_SCRIPT + 1], SessionNotFound)
    assert isinstance(outcomes[count - 1], InvalidRequest)
    assert outcomes[count - 1].param == "session_id"
    written = [n for n in range(count) if n not in refused]
    assert all(isinstance(outcomes[n], int) for n in written)
    for index, sid in enumerate(sids):
        events, last, _ = await store.events.read(tenant, sid)
        mine = [n for n in written if n % 3 == index]
        assert [(e.seq, e.event_id) for e in events] == [
            (seq, f"e{n}") for seq, n in enumerate(mine, 1)
        ]
        assert [outcomes[n] for n in mine] == list(range(1, len(mine) + 1))
        assert last == len(mine)
        # The append that made the log gave it the session's TTL.
        assert 0 < await client.pttl(session_keys(tenant, sid).events) <= TTL_S * 1000


async def test_an_append_that_releases_frees_only_its_holders_lease(
    store: SessionStore, tenant: str
) -> None:
    sid = (await store.create_session(tenant, session_pb2.SessionConfig())).id

    def release(holder: str, session_id: str = sid) -> session_pb2.AppendEventsRequest:
        # Its events, like its other fields, are not written.
        return session_pb2.AppendEventsRequest(
            tenant_id=tenant,
            session_id=session_id,
            holder=holder,
            release_lease=True,
            events=[event("ignored")],
        )

    assert (await store.events.claim(tenant, sid, "conn-a", 10_000)).claimed
    # Another holder's release, and one of a session that is gone: no effect, no error.
    assert await store.events.append_batch([release("conn-b"), release("conn-b", "sess_gone")]) == [
        0,
        0,
    ]
    assert not (await store.events.claim(tenant, sid, "conn-b", 10_000)).claimed
    assert await store.events.append_batch([release("conn-a")]) == [0]
    assert (await store.events.claim(tenant, sid, "conn-b", 10_000)).claimed
    assert await store.events.read(tenant, sid) == ([], 0, 0)


async def test_a_batch_of_claims_of_several_script_runs_answers_each(
    store: SessionStore, tenant: str
) -> None:
    sids = [
        (await store.create_session(tenant, session_pb2.SessionConfig())).id
        for _ in range(APPENDS_PER_SCRIPT + 3)
    ]

    def claims(holder: str) -> list[session_pb2.ClaimSessionRequest]:
        return [
            session_pb2.ClaimSessionRequest(
                tenant_id=tenant, session_id=sid, holder=holder, lease_ms=10_000
            )
            for sid in [*sids, "sess_gone"]
        ]

    first = await store.events.claim_batch(claims("conn-a"))
    assert isinstance(first[-1], SessionNotFound)
    assert all(isinstance(c, session_pb2.ClaimSessionResponse) and c.claimed for c in first[:-1])
    second = await store.events.claim_batch(claims("conn-b"))
    assert all(
        isinstance(c, session_pb2.ClaimSessionResponse) and not c.claimed for c in second[:-1]
    )
    # conn-a learns at its next renewal that conn-b waits for each.
    third = await store.events.claim_batch(claims("conn-a"))
    assert all(
        isinstance(c, session_pb2.ClaimSessionResponse) and c.claimed and c.handoff_requested
        for c in third[:-1]
    )


async def test_events_keep_the_seq_their_writer_gives(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    sid = session.id
    assert await append_events(store, tenant, sid, [event("e5", seq=5), event("e9", seq=9)]) == 9
    assert await append_events(store, tenant, sid, [event("next")]) == 10
    # Not increasing, or not above the last: refused, and nothing of the batch written.
    for batch in ([event("x", seq=12), event("y", seq=11)], [event("z", seq=10)]):
        with pytest.raises(InvalidRequest) as refused:
            await append_events(store, tenant, sid, batch)
        assert refused.value.param == "events.seq"
    events, last, _ = await store.events.read(tenant, sid)
    assert [(e.seq, e.event_id) for e in events] == [(5, "e5"), (9, "e9"), (10, "next")]
    assert last == 10
    # The writer marks the response in progress with its events; "" ends it.
    assert (await store.get_session(tenant, sid)).open_response_id == ""
    await append_events(store, tenant, sid, [event("r1")], open_response_id="resp_1")
    await append_events(store, tenant, sid, [event("r2")])
    assert (await store.get_session(tenant, sid)).open_response_id == "resp_1"
    await append_events(store, tenant, sid, [], open_response_id="")
    assert (await store.get_session(tenant, sid)).open_response_id == ""


async def test_the_open_response_keeps_its_seq_and_the_broker_noted_for_it(
    store: SessionStore, tenant: str
) -> None:
    sid = (await store.create_session(tenant, session_pb2.SessionConfig())).id
    # The broker note may come first (it travels apart from the events)...
    await append_events(store, tenant, sid, [], broker=("resp_1", "10.0.0.7:50052"))
    assert (await store.get_session(tenant, sid)).open_response_broker == ""
    await append_events(
        store,
        tenant,
        sid,
        [event("c1"), event("c2")],
        open_response_id="resp_1",
        open_response_seq=2,
    )
    opened = await store.get_session(tenant, sid)
    assert (opened.open_response_id, opened.open_response_seq) == ("resp_1", 2)
    assert opened.open_response_broker == "10.0.0.7:50052"
    # ...or after the response ended: it never reopens it, nor names a later one's broker.
    await append_events(store, tenant, sid, [event("d1")], open_response_id="")
    await append_events(
        store, tenant, sid, [event("c3")], open_response_id="resp_2", open_response_seq=4
    )
    await append_events(store, tenant, sid, [], broker=("resp_1", "10.0.0.8:50052"))
    later = await store.get_session(tenant, sid)
    assert (later.open_response_id, later.open_response_seq) == ("resp_2", 4)
    assert later.open_response_broker == ""
    await append_events(store, tenant, sid, [], broker=("resp_2", "10.0.0.9:50052"))
    assert (await store.get_session(tenant, sid)).open_response_broker == "10.0.0.9:50052"
    await append_events(store, tenant, sid, [event("d2")], open_response_id="")
    ended = await store.get_session(tenant, sid)
    assert (ended.open_response_id, ended.open_response_seq, ended.open_response_broker) == (
        "",
        0,
        "",
    )


async def test_the_writer_lease_fences_appends_and_hands_over(
    store: SessionStore, tenant: str
) -> None:
    sid = (await store.create_session(tenant, session_pb2.SessionConfig())).id
    first = await store.events.claim(tenant, sid, "conn-a", 10_000)
    assert (first.claimed, first.handoff_requested, first.last_event_seq) == (True, False, 0)
    assert await append_events(store, tenant, sid, [event("a1")], holder="conn-a", lease_ms=10_000)
    # B cannot claim or write while A holds the lease; its claim asks A to hand over.
    second = await store.events.claim(tenant, sid, "conn-b", 10_000)
    assert (second.claimed, second.last_event_seq) == (False, 1)
    with pytest.raises(SessionTakenOver):
        await append_events(store, tenant, sid, [event("b1")], holder="conn-b", lease_ms=10_000)
    renewed = await store.events.claim(tenant, sid, "conn-a", 10_000)
    assert (renewed.claimed, renewed.handoff_requested) == (True, True)
    # A releases; B claims, and A's next write is refused: one writer at a time.
    await store.events.release(tenant, sid, "conn-b")  # not B's to release: no effect
    assert not (await store.events.claim(tenant, sid, "conn-b", 10_000)).claimed
    await store.events.release(tenant, sid, "conn-a")
    taken = await store.events.claim(tenant, sid, "conn-b", 10_000)
    assert (taken.claimed, taken.handoff_requested) == (True, False)
    with pytest.raises(SessionTakenOver):
        await append_events(store, tenant, sid, [event("a2")], holder="conn-a", lease_ms=10_000)
    assert await append_events(store, tenant, sid, [event("b1")], holder="conn-b") == 2
    events, _, _ = await store.events.read(tenant, sid)
    assert [e.event_id for e in events] == ["a1", "b1"]


async def test_an_expired_lease_is_free_to_claim(store: SessionStore, tenant: str) -> None:
    sid = (await store.create_session(tenant, session_pb2.SessionConfig())).id
    assert (await store.events.claim(tenant, sid, "dead-gateway", 200)).claimed
    assert not (await store.events.claim(tenant, sid, "next", 10_000)).claimed
    await asyncio.sleep(0.3)
    assert (await store.events.claim(tenant, sid, "next", 10_000)).claimed
    with pytest.raises(SessionNotFound):
        await store.events.claim(tenant, "sess_missing", "next", 10_000)


async def test_read_events_pages(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    await append_events(store, tenant, session.id, [event(f"e{i}") for i in range(1, 11)])
    seen: list[int] = []
    after = 0
    while True:
        page, last, _ = await store.events.read(tenant, session.id, after_seq=after, limit=4)
        assert last == 10
        if not page:
            break
        assert len(page) <= 4
        seen += [e.seq for e in page]
        after = page[-1].seq
    assert seen == list(range(1, 11))


async def test_event_log_keeps_the_newest_max_events(client: Redis, tenant: str) -> None:
    store = SessionStore(client, ttl_s=TTL_S, max_events=5)
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    for i in range(1, 9):
        await append_events(store, tenant, session.id, [event(f"e{i}")])
    events, last, trimmed = await store.events.read(tenant, session.id)
    assert [e.seq for e in events] == [4, 5, 6, 7, 8]
    assert last == 8
    # A reader can tell what it missed: everything up to seq 3 is gone.
    assert trimmed == 3


async def test_concurrent_event_batches_never_share_a_seq(store: SessionStore, tenant: str) -> None:
    session = await store.create_session(tenant, session_pb2.SessionConfig())
    batches = [[event(f"b{b}-{i}") for i in range(3)] for b in range(20)]
    await asyncio.gather(*(append_events(store, tenant, session.id, batch) for batch in batches))
    events, last, _ = await store.events.read(tenant, session.id)
    assert [e.seq for e in events] == list(range(1, 61))
    assert last == 60
    # Each batch got a contiguous run of seqs, in its own order.
    by_batch: dict[str, list[int]] = {}
    for e in events:
        by_batch.setdefault(e.event_id.split("-")[0], []).append(e.seq)
    assert all(seqs == list(range(seqs[0], seqs[0] + 3)) for seqs in by_batch.values())


async def test_unreachable_redis_fails_fast_as_unavailable() -> None:
    dead = RedisServer()  # never started: nothing listens on its port
    client = redis_client(dead.url)
    store = SessionStore(client, ttl_s=TTL_S)
    try:
        started = time.monotonic()
        assert await store.ping() is False
        with pytest.raises(SessionStoreUnavailable) as caught:
            await store.get_session("acme", "sess_x")
        assert caught.value.message == "The session store is unavailable."
        with pytest.raises(SessionStoreUnavailable):
            await store.append_item("acme", "sess_x", message("m"))
        assert time.monotonic() - started < 2.0
    finally:
        await client.aclose()
        dead.close()


async def test_first_call_after_a_redis_restart_succeeds() -> None:
    with RedisServer() as server:
        client = redis_client(server.url)
        store = SessionStore(client, ttl_s=TTL_S)
        try:
            # Fill the pool with several connections the restart will break.
            await asyncio.gather(*(store.ping() for _ in range(5)))
            server.stop(kill=True)
            server.start()
            # Let the loop see the old sockets close, as it would between requests
            # in a running service (stop/start above block the loop).
            await asyncio.sleep(0.1)
            session = await store.create_session("acme", session_pb2.SessionConfig())
            assert (await store.get_session("acme", session.id)).id == session.id
            # A restarted server has no cached Lua scripts; they are loaded on demand.
            await store.append_item("acme", session.id, message("m1"))
            assert await item_ids(store, "acme", session.id) == ["m1"]
        finally:
            await client.aclose()


async def test_a_hung_redis_times_out_instead_of_hanging() -> None:
    with RedisServer() as server:
        client = redis_client(server.url)
        store = SessionStore(client, ttl_s=TTL_S)
        process = server._process
        assert process is not None
        try:
            session = await store.create_session("acme", session_pb2.SessionConfig())
            process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailable):
                await store.get_session("acme", session.id)
            assert time.monotonic() - started < 2.0
        finally:
            process.send_signal(signal.SIGCONT)
            await client.aclose()
