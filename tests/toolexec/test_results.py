"""Idempotency in a real Redis: the store itself, and two toolexec replicas sharing it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from switchboard.redis_client import redis_client
from switchboard.toolexec.results import (
    Claimed,
    RedisResultStore,
    Running,
    StoredResult,
    result_key,
)
from switchboard.toolexec.webhooks import WebhookClient
from tests.toolexec.receiver import SECRET, Receiver
from tests.toolexec.support import (
    C,
    T,
    clean_environ,
    config,
    execute,
    grpc_stub,
    servicer,
    toolexec_process,
    webhook,
)
from tools.redis_server import RedisServer, free_port

ORDER = {"order_id": "ord_1"}


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def new_call_id() -> str:
    # The Redis server is shared by the whole session: every test uses fresh ids.
    return f"call_{uuid.uuid4().hex[:12]}"


# --- the store ----------------------------------------------------------------


async def test_claim_put_peek_and_release(redis: Redis) -> None:
    store = RedisResultStore(redis, ttl_s=3600)
    call_id = new_call_id()
    key = result_key("acme", call_id)
    assert key == f"sb:{{acme}}:toolcall:{call_id}"

    mine = await store.claim("acme", call_id, "fp1", lease_s=5)
    assert isinstance(mine, Claimed)
    assert 0 < await redis.pttl(key) <= 5000
    # Every other claim sees the call running, with its fingerprint.
    assert await store.claim("acme", call_id, "fp1", lease_s=5) == Running("fp1")
    assert await store.peek("acme", call_id) == Running("fp1")
    # Call ids are per tenant.
    assert isinstance(await store.claim("globex", call_id, "fp1", lease_s=5), Claimed)

    # Only the holder's release removes the claim.
    await store.release("acme", call_id, Claimed("run:someone-else:fp1"))
    assert await store.peek("acme", call_id) == Running("fp1")
    await store.release("acme", call_id, mine)
    assert await store.peek("acme", call_id) is None

    again = await store.claim("acme", call_id, "fp1", lease_s=5)
    assert isinstance(again, Claimed)
    await store.put("acme", call_id, StoredResult("fp1", b"\x00response:bytes"))
    assert await store.claim("acme", call_id, "fp1", lease_s=5) == StoredResult(
        "fp1", b"\x00response:bytes"
    )
    assert 3590 < await redis.ttl(key) <= 3600


async def test_a_claim_ends_with_its_lease(redis: Redis) -> None:
    store = RedisResultStore(redis)
    call_id = new_call_id()
    assert isinstance(await store.claim("acme", call_id, "fp", lease_s=0.1), Claimed)
    await asyncio.sleep(0.2)
    assert isinstance(await store.claim("acme", call_id, "fp", lease_s=0.1), Claimed)


def test_ids_that_could_break_the_key_are_hashed() -> None:
    key = result_key("acme}:x", "call\n{1}")
    assert key.startswith("sb:{~")
    assert "\n" not in key and key.count("{") == 1 and key.count("}") == 1
    assert result_key("acme", "call_1") != result_key("acme", "call_2")


# --- two replicas ---------------------------------------------------------------


async def test_two_replicas_run_a_call_once(redis_server: RedisServer, receiver: Receiver) -> None:
    tools = config([webhook("lookup_order", receiver.url("/slow-echo"))])
    clients = [redis_client(redis_server.url) for _ in range(2)]
    hooks = [WebhookClient() for _ in range(2)]
    try:
        replicas = [
            servicer(tools, hook, RedisResultStore(client))
            for hook, client in zip(hooks, clients, strict=True)
        ]
        async with grpc_stub(replicas[0]) as first, grpc_stub(replicas[1]) as second:
            call_id = new_call_id()
            both = await asyncio.gather(
                execute(first, "lookup_order", ORDER, call_id=call_id),
                execute(second, "lookup_order", ORDER, call_id=call_id),
            )
            assert receiver.count("/slow-echo") == 1
            # A retry later, on either replica, is a replay too.
            later = await execute(second, "lookup_order", ORDER, call_id=call_id)
            assert receiver.count("/slow-echo") == 1
            # Another call_id is another call.
            other = await execute(first, "lookup_order", ORDER, call_id=new_call_id())
    finally:
        for hook in hooks:
            await hook.close()
        for client in clients:
            await client.aclose()
    assert receiver.count("/slow-echo") == 2  # the other call_id ran
    assert [r.outcome for r in both] == [T.TOOL_OUTCOME_OK, T.TOOL_OUTCOME_OK]
    assert both[0].output == both[1].output == later.output
    assert json.loads(both[0].output)["call_id"] == call_id
    assert sorted(r.replayed for r in both) == [False, True]
    assert later.replayed
    assert not other.replayed


async def test_a_reused_call_id_is_refused_on_the_other_replica(
    redis: Redis, receiver: Receiver, webhooks: WebhookClient
) -> None:
    tools = config([webhook("lookup_order", receiver.url("/echo"))])
    call_id = new_call_id()
    async with grpc_stub(servicer(tools, webhooks, RedisResultStore(redis))) as stub:
        await execute(stub, "lookup_order", {"order_id": "a"}, call_id=call_id)
    async with grpc_stub(servicer(tools, webhooks, RedisResultStore(redis))) as stub:
        reused = await execute(stub, "lookup_order", {"order_id": "b"}, call_id=call_id)
    assert reused.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert "was already used for another call" in reused.error_message
    assert receiver.count("/echo") == 1


async def test_a_claim_left_by_a_dead_replica_is_taken_over_after_its_lease(
    redis: Redis, receiver: Receiver, webhooks: WebhookClient
) -> None:
    from switchboard.toolexec.outcomes import fingerprint

    tools = config([webhook("lookup_order", receiver.url("/echo"))])
    call_id = new_call_id()
    request = T.ExecuteRequest(
        tenant_id="acme", call_id=call_id, name="lookup_order", arguments=json.dumps(ORDER)
    )
    # The "dead replica": claimed the call, then never finished it.
    store = RedisResultStore(redis)
    assert isinstance(
        await store.claim("acme", call_id, fingerprint(request), lease_s=0.4), Claimed
    )
    async with grpc_stub(servicer(tools, webhooks, RedisResultStore(redis))) as stub:
        started = time.monotonic()
        response = await execute(stub, "lookup_order", ORDER, call_id=call_id)
    assert response.outcome == T.TOOL_OUTCOME_OK
    assert not response.replayed
    assert time.monotonic() - started >= 0.3
    assert receiver.count("/echo") == 1


async def test_without_redis_calls_are_refused_not_run_twice(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        tools = config([webhook("lookup_order", receiver.url("/echo"))])
        async with grpc_stub(servicer(tools, webhooks, RedisResultStore(client))) as stub:
            refused = await execute(stub, "lookup_order", ORDER, call_id=new_call_id())
            # A call without a call_id is never deduplicated, so it needs no store.
            unkeyed = await execute(stub, "lookup_order", ORDER)
    finally:
        await client.aclose()
    assert refused.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert refused.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED
    assert refused.error_message == (
        "The tool call store is unavailable, so the call was not run; retry later."
    )
    assert unkeyed.outcome == T.TOOL_OUTCOME_OK
    assert receiver.count("/echo") == 1


# --- the process ------------------------------------------------------------------


async def test_the_process_runs_webhooks_with_redis_idempotency(
    tmp_path: Path, redis_server: RedisServer, receiver: Receiver
) -> None:
    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text(
        json.dumps(
            {
                "allow_private_hosts": ["127.0.0.1"],
                "tenants": {"acme": {"webhooks": [webhook("lookup_order", receiver.url("/echo"))]}},
            }
        )
    )
    port = free_port()
    env = clean_environ(
        SWITCHBOARD_TOOLEXEC_LISTEN=f"127.0.0.1:{port}",
        SWITCHBOARD_TOOLEXEC_TOOLS_FILE=str(tools_file),
        SWITCHBOARD_REDIS_URL=redis_server.url,
        ACME_SECRET=SECRET,
    )
    async with toolexec_process(env, port) as process:
        call_id = new_call_id()
        first = await execute(process.stub, "lookup_order", ORDER, call_id=call_id)
        again = await execute(process.stub, "lookup_order", ORDER, call_id=call_id)
        builtin = await execute(process.stub, "calculate", {"expression": "1 + 1"})
    assert process.returncode == 0, process.stderr
    assert first.outcome == T.TOOL_OUTCOME_OK, first.error_message
    assert again.replayed and again.output == first.output
    # The file gives acme no built-ins.
    assert builtin.outcome == T.TOOL_OUTCOME_NOT_ALLOWED
    assert receiver.count("/echo") == 1
    assert SECRET not in process.stderr
