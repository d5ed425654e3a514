"""SessionService through a real grpc.aio server and channel, against real Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from switchboard import rpc
from switchboard.errors import GRPC_CODE_KEY, GRPC_PARAM_KEY
from switchboard.redis_client import redis_client
from switchboard.session.service import SERVICE_NAME, SessionServicer
from switchboard.session.store import SessionStore
from switchboard.v1 import session_pb2_grpc
from tests.session.support import (
    C,
    S,
    Stub,
    create,
    eventually,
    main_serving,
    message,
    rpc_error,
    run_main,
    start_server,
    trailers,
)
from tools.redis_server import RedisServer, free_port


@pytest.fixture
async def stub(store: SessionStore) -> AsyncIterator[Stub]:
    server, port = await start_server(SessionServicer(store, default_context_tokens=1000))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield session_pb2_grpc.SessionServiceStub(channel)
    await server.stop(None)


async def append(
    stub: Stub, tenant: str, session_id: str, item: C.Item, previous: str = ""
) -> S.AppendItemResponse:
    request = S.AppendItemRequest(
        tenant_id=tenant, session_id=session_id, item=item, previous_item_id=previous
    )
    return await stub.AppendItem(request)


async def listed(stub: Stub, tenant: str, session_id: str) -> list[str]:
    """The ids of the session's items in order (all of them: the budget holds them all)."""
    request = S.BuildContextRequest(
        tenant_id=tenant, session_id=session_id, max_context_tokens=1_000_000
    )
    context = await stub.BuildContext(request)
    assert context.dropped_items == 0
    return [item.id for item in context.items]


def one_append(**fields: Any) -> S.AppendEventsBatchRequest:
    return S.AppendEventsBatchRequest(appends=[S.AppendEventsRequest(**fields)])


async def test_session_lifecycle(stub: Stub, tenant: str) -> None:
    session = await create(stub, tenant, model="gpt-realtime", instructions="be brief")
    assert session.id.startswith("sess_")
    assert session.expires_at_ms > session.created_at_ms
    got = await stub.GetSession(S.GetSessionRequest(tenant_id=tenant, session_id=session.id))
    assert got.config.instructions == "be brief"
    updated = await stub.UpdateSession(
        S.UpdateSessionRequest(
            tenant_id=tenant, session_id=session.id, config=S.SessionConfig(model="m2")
        )
    )
    assert updated.config == S.SessionConfig(model="m2")
    error = await rpc_error(
        stub.GetSession(S.GetSessionRequest(tenant_id=tenant, session_id="sess_missing"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert trailers(error)[GRPC_CODE_KEY] == "session_not_found"


async def test_tenant_b_cannot_touch_tenant_a(stub: Stub, tenant: str) -> None:
    session = await create(stub, tenant)
    await append(stub, tenant, session.id, message("a1"))
    other = f"{tenant}-b"
    ids = {"tenant_id": other, "session_id": session.id}
    calls = [
        lambda: stub.GetSession(S.GetSessionRequest(**ids)),
        lambda: stub.UpdateSession(S.UpdateSessionRequest(**ids, config=S.SessionConfig())),
        lambda: stub.AppendItem(S.AppendItemRequest(**ids, item=message("b1"))),
        lambda: stub.GetItem(S.GetItemRequest(**ids, item_id="a1")),
        lambda: stub.DeleteItem(S.DeleteItemRequest(**ids, item_id="a1")),
        lambda: stub.BuildContext(S.BuildContextRequest(**ids)),
        lambda: stub.ReadEvents(S.ReadEventsRequest(**ids)),
    ]
    for call in calls:
        error = await rpc_error(call())
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert trailers(error)[GRPC_CODE_KEY] == "session_not_found"
    # A batch answers each append on its own, in its result.
    batch = await stub.AppendEventsBatch(one_append(**ids, events=[S.SessionEvent()]))
    assert [r.error_code for r in batch.results] == [C.ERROR_CODE_SESSION_NOT_FOUND]
    assert await listed(stub, tenant, session.id) == ["a1"]
    item = await stub.GetItem(
        S.GetItemRequest(tenant_id=tenant, session_id=session.id, item_id="a1")
    )
    assert item.content[0].text == "hi"


async def test_items_in_order_with_previous_item_id(stub: Stub, tenant: str) -> None:
    sid = (await create(stub, tenant)).id
    first = await append(stub, tenant, sid, message(""))
    assert first.item.id.startswith("item_") and first.previous_item_id == ""
    auto = first.item.id
    assert (await append(stub, tenant, sid, message("c"))).previous_item_id == auto
    assert (await append(stub, tenant, sid, message("b"), auto)).previous_item_id == auto
    assert (await append(stub, tenant, sid, message("z"), "root")).previous_item_id == ""
    assert await listed(stub, tenant, sid) == ["z", auto, "b", "c"]

    await stub.DeleteItem(S.DeleteItemRequest(tenant_id=tenant, session_id=sid, item_id="b"))
    assert await listed(stub, tenant, sid) == ["z", auto, "c"]
    missing = await rpc_error(
        stub.DeleteItem(S.DeleteItemRequest(tenant_id=tenant, session_id=sid, item_id="b"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert trailers(missing)[GRPC_CODE_KEY] == "item_not_found"

    unknown = await rpc_error(append(stub, tenant, sid, message("d"), "nope"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert trailers(unknown) == {
        GRPC_CODE_KEY: "item_not_found",
        GRPC_PARAM_KEY: "previous_item_id",
    }
    duplicate = await rpc_error(append(stub, tenant, sid, message("c")))
    assert duplicate.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers(duplicate) == {GRPC_CODE_KEY: "invalid_value", GRPC_PARAM_KEY: "item.id"}


async def test_fifty_concurrent_appends_are_each_kept_once(stub: Stub, tenant: str) -> None:
    sid = (await create(stub, tenant)).id
    replies = await asyncio.gather(
        *(append(stub, tenant, sid, message(f"m{i:02d}")) for i in range(50))
    )
    ids = await listed(stub, tenant, sid)
    assert sorted(ids) == [f"m{i:02d}" for i in range(50)]
    # Each reply names the item that really was before it at insertion time.
    befores = {reply.item.id: reply.previous_item_id for reply in replies}
    assert [befores[i] for i in ids] == ["", *ids[:-1]]


async def test_bad_ids_are_invalid_argument(stub: Stub) -> None:
    error = await rpc_error(
        stub.GetSession(S.GetSessionRequest(tenant_id="bad tenant", session_id="sess_x"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers(error) == {GRPC_CODE_KEY: "invalid_value", GRPC_PARAM_KEY: "tenant_id"}
    missing = await rpc_error(stub.CreateSession(S.CreateSessionRequest()))
    assert trailers(missing) == {
        GRPC_CODE_KEY: "missing_required_parameter",
        GRPC_PARAM_KEY: "tenant_id",
    }


async def test_build_context_keeps_newest_turns(stub: Stub, tenant: str) -> None:
    sid = (await create(stub, tenant, instructions="x" * 40)).id  # 10 + 4 tokens
    for turn in range(3):
        await append(stub, tenant, sid, message(f"u{turn}", "q" * 80))  # 20 + 4
        await append(stub, tenant, sid, message(f"a{turn}", "r" * 80, C.ROLE_ASSISTANT))
    whole = await stub.BuildContext(S.BuildContextRequest(tenant_id=tenant, session_id=sid))
    assert whole.instructions == "x" * 40
    assert [i.id for i in whole.items] == ["u0", "a0", "u1", "a1", "u2", "a2"]
    assert (whole.estimated_tokens, whole.dropped_items) == (14 + 6 * 24, 0)
    # 14 + 2 turns of 48 = 110 fits; 109 does not.
    for budget, kept in ((110, ["u1", "a1", "u2", "a2"]), (109, ["u2", "a2"])):
        window = await stub.BuildContext(
            S.BuildContextRequest(tenant_id=tenant, session_id=sid, max_context_tokens=budget)
        )
        assert [i.id for i in window.items] == kept
        assert window.dropped_items == 6 - len(kept)


async def test_append_item_with_context_is_build_context_after_the_append(
    stub: Stub, tenant: str
) -> None:
    sid = (await create(stub, tenant, instructions="x" * 40)).id
    await append(stub, tenant, sid, message("u0", "q" * 80))
    await append(stub, tenant, sid, message("a0", "r" * 80, C.ROLE_ASSISTANT))
    plain = await append(stub, tenant, sid, message("n0"))
    assert not plain.HasField("context")  # only when asked for
    ids = {"tenant_id": tenant, "session_id": sid}
    for budget in (0, 40):
        reply = await stub.AppendItem(
            S.AppendItemRequest(
                **ids,
                item=message(f"u{budget + 1}", "q" * 80),
                previous_item_id="root" if budget else "",
                with_context=True,
                max_context_tokens=budget,
            )
        )
        built = await stub.BuildContext(S.BuildContextRequest(**ids, max_context_tokens=budget))
        assert reply.context == built
    everything = await stub.BuildContext(S.BuildContextRequest(**ids))
    assert [i.id for i in everything.items] == ["u41", "u0", "a0", "n0", "u1"]
    assert [i.id for i in reply.context.items] == ["u1"]  # the budget of 40 kept one turn
    # A refused append reads nothing: its error, as without the context.
    duplicate = await rpc_error(
        stub.AppendItem(S.AppendItemRequest(**ids, item=message("u0"), with_context=True))
    )
    assert trailers(duplicate) == {GRPC_CODE_KEY: "invalid_value", GRPC_PARAM_KEY: "item.id"}
    gone = await rpc_error(
        stub.AppendItem(
            S.AppendItemRequest(
                tenant_id=tenant, session_id="sess_missing", item=message("x"), with_context=True
            )
        )
    )
    assert trailers(gone)[GRPC_CODE_KEY] == "session_not_found"


async def test_event_log_seq_and_paging(stub: Stub, tenant: str) -> None:
    sid = (await create(stub, tenant)).id
    ids = {"tenant_id": tenant, "session_id": sid}

    def batch(*names: str) -> list[S.SessionEvent]:
        return [S.SessionEvent(event_id=n, payload=n.encode()) for n in names]

    first = await stub.AppendEventsBatch(one_append(**ids, events=batch("a", "b")))
    assert [r.last_seq for r in first.results] == [2]
    replies = await asyncio.gather(
        *(stub.AppendEventsBatch(one_append(**ids, events=batch(f"c{i}"))) for i in range(8))
    )
    assert sorted(r.results[0].last_seq for r in replies) == list(range(3, 11))
    assert (await stub.GetSession(S.GetSessionRequest(**ids))).last_event_seq == 10

    page = await stub.ReadEvents(S.ReadEventsRequest(**ids, after_seq=0, limit=4))
    assert [e.seq for e in page.events] == [1, 2, 3, 4]
    assert [e.event_id for e in page.events[:2]] == ["a", "b"]
    assert page.events[0].payload == b"a" and page.last_seq == 10
    rest = await stub.ReadEvents(S.ReadEventsRequest(**ids, after_seq=4))
    assert [e.seq for e in rest.events] == list(range(5, 11))
    done = await stub.ReadEvents(S.ReadEventsRequest(**ids, after_seq=10))
    assert (list(done.events), done.last_seq) == ([], 10)


class FailingStore(SessionStore):
    async def get_session(self, tenant_id: str, session_id: str) -> S.Session:
        raise RuntimeError("secret prompt text")


async def test_unexpected_errors_are_logged_and_internal(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailingStore(store._redis, ttl_s=600)
    server, port = await start_server(SessionServicer(failing, default_context_tokens=1000))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            with caplog.at_level(logging.ERROR, "switchboard.session"):
                error = await rpc_error(
                    stub.GetSession(S.GetSessionRequest(tenant_id="acme", session_id="sess_1"))
                )
    finally:
        await server.stop(None)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert trailers(error)[GRPC_CODE_KEY] == "internal_error"
    assert "secret" not in (error.details() or "")
    [record] = [r for r in caplog.records if r.name == "switchboard.session.service"]
    fields = (record.__dict__[k] for k in ("tenant_id", "session_id", "rpc"))
    assert tuple(fields) == ("acme", "sess_1", "GetSession")
    assert "secret" not in record.getMessage()


async def test_redis_down_fails_fast_reports_not_serving_and_recovers() -> None:
    redis = RedisServer()
    redis.start()
    client = redis_client(redis.url)
    store = SessionStore(client, ttl_s=600)
    servicer = SessionServicer(store, default_context_tokens=1000)
    address = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    serving = asyncio.create_task(
        rpc.serve(
            SERVICE_NAME,
            address,
            servicer.register,
            probe=store.ping,
            probe_interval_s=0.1,
            grace_s=0.5,
            stop=stop,
        )
    )
    try:
        async with rpc.channel(address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            await eventually(lambda: rpc.check_health(channel))
            session = await create(stub, "acme")

            redis.stop(kill=True)
            started = time.monotonic()
            error = await rpc_error(
                stub.GetSession(
                    S.GetSessionRequest(tenant_id="acme", session_id=session.id), timeout=5
                )
            )
            assert time.monotonic() - started < 2.0
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert trailers(error)[GRPC_CODE_KEY] == "session_store_unavailable"
            assert error.details() == "The session store is unavailable."

            async def not_serving() -> bool:
                return not await rpc.check_health(channel)

            await eventually(not_serving, timeout_s=2.0)

            redis.start()
            await eventually(lambda: rpc.check_health(channel))
            again = await create(stub, "acme")  # a plain restart lost the old data
            got = await stub.GetSession(S.GetSessionRequest(tenant_id="acme", session_id=again.id))
            assert got.id == again.id
    finally:
        stop.set()
        await serving
        await client.aclose()
        redis.close()


def test_bad_configuration_exits_2_with_one_line() -> None:
    process = run_main({"SWITCHBOARD_SESSION_TTL_S": "soon"})
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "SWITCHBOARD_SESSION_TTL_S" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


async def test_main_serves_and_stops_on_sigterm(redis_server: RedisServer) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = run_main(
        {"SWITCHBOARD_REDIS_URL": redis_server.url, "SWITCHBOARD_SESSION_LISTEN": address}
    )
    try:
        async with rpc.channel(address) as channel:
            await main_serving(process, channel)
            stub = session_pb2_grpc.SessionServiceStub(channel)
            session = await create(stub, "acme")
            assert session.id.startswith("sess_")
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


async def test_a_batch_of_appends_answers_each_on_its_own(stub: Stub, tenant: str) -> None:
    sid = (await create(stub, tenant)).id
    other = (await create(stub, tenant)).id

    def append(session_id: str, name: str, holder: str) -> S.AppendEventsRequest:
        return S.AppendEventsRequest(
            tenant_id=tenant,
            session_id=session_id,
            holder=holder,
            events=[S.SessionEvent(event_id=name, payload=name.encode())],
        )

    claim = S.ClaimSessionRequest(tenant_id=tenant, session_id=sid, holder="conn-a")
    assert (await stub.ClaimSession(claim)).claimed
    reply = await stub.AppendEventsBatch(
        S.AppendEventsBatchRequest(
            appends=[
                append(other, "o1", "conn-o"),
                append(sid, "b1", "conn-b"),  # A holds sid: refused, alone
                append("sess_missing", "m1", "conn-m"),
            ]
        )
    )
    results = [(r.last_seq, C.ErrorCode.Name(r.error_code)) for r in reply.results]
    assert results == [
        (1, "ERROR_CODE_UNSPECIFIED"),
        (0, "ERROR_CODE_SESSION_TAKEN_OVER"),
        (0, "ERROR_CODE_SESSION_NOT_FOUND"),
    ]
    page = await stub.ReadEvents(S.ReadEventsRequest(tenant_id=tenant, session_id=other))
    assert [e.event_id for e in page.events] == ["o1"]
    assert not (await stub.ReadEvents(S.ReadEventsRequest(tenant_id=tenant, session_id=sid))).events


async def test_a_batch_of_claims_answers_each_on_its_own(stub: Stub, tenant: str) -> None:
    """One ClaimSessionsBatch, every outcome a claim can have, each in its place."""
    free, mine, theirs, wanted = [(await create(stub, tenant)).id for _ in range(4)]

    def claim(session_id: str, holder: str) -> S.ClaimSessionRequest:
        return S.ClaimSessionRequest(
            tenant_id=tenant, session_id=session_id, holder=holder, lease_ms=10_000
        )

    for request in (claim(mine, "conn-mine"), claim(theirs, "conn-x"), claim(wanted, "conn-w")):
        assert (await stub.ClaimSession(request)).claimed
    # Another connection asks for `wanted`: its holder learns it at its next claim.
    assert not (await stub.ClaimSession(claim(wanted, "conn-resumer"))).claimed
    reply = await stub.ClaimSessionsBatch(
        S.ClaimSessionsBatchRequest(
            claims=[
                claim(free, "conn-free"),
                claim(theirs, "conn-theirs"),  # conn-x holds it: refused, asked for
                claim("sess_missing", "conn-m"),
                claim(mine, "conn-mine"),
                claim("bad{id", "conn-b"),
                claim(wanted, "conn-w"),
                claim(free, ""),
            ]
        )
    )
    results = [
        (r.claim.claimed, r.claim.handoff_requested, C.ErrorCode.Name(r.error_code), r.error_param)
        for r in reply.results
    ]
    assert results == [
        (True, False, "ERROR_CODE_UNSPECIFIED", ""),
        (False, False, "ERROR_CODE_UNSPECIFIED", ""),
        (False, False, "ERROR_CODE_SESSION_NOT_FOUND", "session_id"),
        (True, False, "ERROR_CODE_UNSPECIFIED", ""),
        (False, False, "ERROR_CODE_INVALID_VALUE", "session_id"),
        (True, True, "ERROR_CODE_UNSPECIFIED", ""),
        (False, False, "ERROR_CODE_MISSING_REQUIRED_PARAMETER", "holder"),
    ]
    # Each claim did what it would alone: conn-x was asked for its session ...
    assert (await stub.ClaimSession(claim(theirs, "conn-x"))).handoff_requested
    # ... and conn-free holds its own, so nobody else gets it.
    assert not (await stub.ClaimSession(claim(free, "conn-other"))).claimed
