"""Resume: a client that loses its connection reconnects to another gateway process
with the id of the last event it saw, and gets the rest: nothing lost, nothing twice.

Two gateway processes share the backends and Redis. Every event a gateway sends is
recorded in the session's event log (deltas at the next checkpoint, anything else
before it is sent), so the events a client received, plus the ones the resumed
connection sends, must be exactly the log; but for the deltas a killed gateway
sent and never recorded, which the log holds as one delta under the id of the
client's last (taken from the model call's transcript at the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import websockets
from redis.asyncio import Redis

from switchboard.gateway.ids import event_seq
from tests.e2e.conftest import RealtimeClient, reply_text
from tools.stack import Ports, Stack

# The writer lease of a killed gateway lapses after 1 s (10 s by default).
LEASE_S = "1"
# A session's keys (docs/session.md).
KEYS = ("meta", "items", "order", "events", "owner", "wanted")
# A broker keeps a dead gateway's model call for 8 s (60 s by default): time for a
# resume on a loaded machine (the killed gateway's lease lapses first).
ORPHAN_GRACE_S = "8"


def two_gateways(**env: str) -> Stack:
    return Stack(
        ports=Ports.free(),
        replicas=2,
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "12"],
        extra_env={
            "SWITCHBOARD_GATEWAY_SESSION_LEASE_S": LEASE_S,
            "SWITCHBOARD_BROKER_ORPHAN_GRACE_S": ORPHAN_GRACE_S,
            **env,
        },
    )


@pytest.fixture(scope="module", params=["recorded", "checkpoints"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Gateways that record every event before sending it, or (with checkpoints)
    send deltas at once and record them at most 100 ms later."""
    checkpoint_s = "0.1" if request.param == "checkpoints" else "0"
    with two_gateways(SWITCHBOARD_GATEWAY_CHECKPOINT_S=checkpoint_s) as stack:
        yield stack


def url(stack: Stack, gateway: int, **query: str) -> str:
    port = stack.gateway_ports[gateway]
    params = "&".join(f"{k}={v}" for k, v in {"model": "gpt-realtime", **query}.items())
    return f"ws://127.0.0.1:{port}/v1/realtime?{params}"


def open_client(stack: Stack, gateway: int, **query: str) -> Any:
    return websockets.connect(
        url(stack, gateway, **query),
        additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
        max_size=None,
    )


async def ask(client: RealtimeClient, text: str) -> None:
    """Add a user message and ask for a response, reading nothing."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await client.send({"type": "conversation.item.create", "item": item})
    await client.send({"type": "response.create"})


async def read_until_done(client: RealtimeClient) -> list[dict[str, Any]]:
    events = []
    while not events or events[-1]["type"] != "response.done":
        events.append(await client.recv(timeout_s=30))
    return events


async def uninterrupted(stack: Stack, prompt: str) -> str:
    """The reply to `prompt` in a new session, read to the end (the simulator's
    reply is a function of the conversation)."""
    async with open_client(stack, 0) as connection:
        client = RealtimeClient(connection)
        await client.recv()
        await ask(client, prompt)
        return reply_text(await read_until_done(client))


async def whole_log(stack: Stack, session_id: str, gateway: int = 1) -> list[dict[str, Any]]:
    """Every event of the session's log, by resuming from the start. The replay
    comes before the answer to any client event, so an event whose answer is an
    error marks its end."""
    async with open_client(stack, gateway, session_id=session_id) as connection:
        client = RealtimeClient(connection)
        await client.send({"type": "conversation.item.retrieve", "item_id": "end_of_replay"})
        events = []
        while True:
            event = await client.recv(timeout_s=30)
            if event["type"] == "error" and "end_of_replay" in event["error"]["message"]:
                return events
            events.append(event)


DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


def merged(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive deltas of one output as one event, with the last one's id."""
    out: list[dict[str, Any]] = []
    for event in events:
        last = out[-1] if out else None
        if (
            last is not None
            and event["type"] in DELTAS
            and (last["type"], last["item_id"]) == (event["type"], event["item_id"])
        ):
            out[-1] = {**event, "delta": last["delta"] + event["delta"]}
        else:
            out.append(event)
    return out


def assert_logged(log: list[dict[str, Any]], received: list[dict[str, Any]], context: str) -> None:
    """What the client received is the log: event for event where the log has the
    event's id, and the same deltas merged where it has not (a gap)."""
    by_id = {event["event_id"]: event for event in log}
    for event in received:
        logged = by_id.get(event["event_id"])
        if logged is None or logged["type"] in DELTAS:
            # A gap is logged under the id of the client's last delta, whole.
            assert event["type"] in DELTAS, context
            assert logged is None or logged["delta"].endswith(event["delta"]), context
        else:
            assert logged == event, context
    expected = merged(received)
    assert merged(log)[: len(expected)] == expected, context


def assert_in_order_once(events: list[dict[str, Any]]) -> None:
    seqs = [event_seq(e["event_id"]) for e in events]
    assert None not in seqs
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_drops_at_random_points_lose_and_repeat_nothing(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    prompt = 'resume me [[sim {"tokens": 60, "token_delay_ms": 8}]]'
    expected = await uninterrupted(stack, prompt)
    assert len(expected.split()) == 60
    for trial in range(8):
        async with open_client(stack, 0) as connection:
            first = RealtimeClient(connection)
            created = await first.recv()
            session_id = created["session"]["id"]
            await ask(first, prompt)
            received = [created]
            # Drop the connection after a random number of events of the response.
            for _ in range(rng.randrange(1, 40)):
                received.append(await first.recv())
            connection.transport.abort()  # as a lost network does: no close frame
        # Resume on the other gateway from the last event seen.
        async with open_client(
            stack, 1, session_id=session_id, last_event_id=received[-1]["event_id"]
        ) as connection:
            second = RealtimeClient(connection)
            if received[-1]["type"] != "response.done":
                received += await read_until_done(second)
            # The resumed connection is a live one: a next turn works on it.
            await ask(second, "and now?")
            after = await read_until_done(second)
            assert after[-1]["response"]["status"] == "completed"
        context = f"seed {seed}, trial {trial}"
        assert reply_text(received) == expected, context
        assert received[-1]["response"]["status"] == "completed", context
        assert_in_order_once(received)
        # Event for event, what the client saw is the session's log.
        log = await whole_log(stack, session_id)
        assert log[: len(received)] == received, context
        assert log[len(received) :][-1]["type"] == "response.done", context


async def test_a_resume_names_a_session_of_its_own_tenant_and_an_event_it_has(
    stack: Stack,
) -> None:
    async with open_client(stack, 0) as connection:
        session_id = orjson.loads(await connection.recv())["session"]["id"]
    refusals = [
        ("sess_unknown", "", 404),
        (session_id, "not-an-event-id", 400),
        # An event id past the log's end: events the log never had.
        (session_id, "event_0123456789ab" + "f" * 6, 410),
        # A delta's past it, with no response open: not one sent before recording.
        (session_id, "event_0123456789ab" + "f" * 6 + "o1f", 410),
    ]
    for target, last_event_id, status in refusals:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with open_client(stack, 1, session_id=target, last_event_id=last_event_id):
                pass
        assert refused.value.response.status_code == status, (target, last_event_id)


async def test_killed_gateways_the_resumed_clients_get_the_whole_reply(stack: Stack) -> None:
    """SIGKILL the client's gateway at random points of responses: the client resumes
    on the other gateway, which re-attaches to the model call (kept running by the
    broker) and finishes the response; the reassembled text equals the
    uninterrupted reply, event for event as logged, and the session goes on."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    prompt = 'kill me [[sim {"tokens": 80, "token_delay_ms": 10}]]'
    killed = stack.services["gateway"]
    for trial in range(3):
        context = f"seed {seed}, trial {trial}"
        expected = await uninterrupted(stack, prompt)
        try:
            async with open_client(stack, 0) as connection:
                first = RealtimeClient(connection)
                created = await first.recv()
                session_id = created["session"]["id"]
                await ask(first, prompt)
                received = [created]
                while received[-1]["type"] != "response.created":
                    received.append(await first.recv())
                # Some kills land before the first token, most mid-stream.
                for _ in range(rng.randrange(0, 50)):
                    received.append(await first.recv())
                killed.stop(kill=True)
            assert killed.process is None
            async with open_client(
                stack, 1, session_id=session_id, last_event_id=received[-1]["event_id"]
            ) as connection:
                second = RealtimeClient(connection)
                received += await read_until_done(second)
                done = received[-1]["response"]
                assert done["status"] == "completed", (context, done["status_details"])
                # The finished reply is stored in the conversation, whole.
                (item,) = done["output"]
                await second.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
                stored = (await second.recv_until("conversation.item.retrieved"))[-1]["item"]
                assert stored["status"] == "completed", context
                assert stored["content"][0]["text"] == expected, context
                await ask(second, "still there?")
                after = await read_until_done(second)
                assert after[-1]["response"]["status"] == "completed", context
        finally:
            stack.restart("gateway")
        assert reply_text(received) == expected, context
        assert_in_order_once(received)
        texts = [e["text"] for e in received if e["type"] == "response.output_text.done"]
        assert texts == [expected], context
        assert_logged(await whole_log(stack, session_id), received, context)


async def test_a_call_gone_from_its_broker_ends_interrupted_with_its_text_kept(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Resume after the broker dropped the dead gateway's call (its orphan grace
    passed): the response ends `failed` with `response_interrupted`, and the text
    sent so far (with checkpoints: recorded so far) closes as an incomplete item."""
    recorded_first = request.node.callspec.params["stack"] == "recorded"
    killed = stack.services["gateway"]
    try:
        async with open_client(stack, 0) as connection:
            first = RealtimeClient(connection)
            created = await first.recv()
            session_id = created["session"]["id"]
            await ask(first, 'a long one [[sim {"tokens": 2000, "token_delay_ms": 10}]]')
            received = [created]
            while reply_text(received).count(" ") < 20:
                received.append(await first.recv())
            killed.stop(kill=True)
        await asyncio.sleep(float(ORPHAN_GRACE_S) + 1.0)
        async with open_client(
            stack, 1, session_id=session_id, last_event_id=received[-1]["event_id"]
        ) as connection:
            second = RealtimeClient(connection)
            received += await read_until_done(second)
            done = received[-1]["response"]
            assert done["status"] == "failed"
            assert done["status_details"]["error"]["code"] == "response_interrupted"
            (item,) = done["output"]
            assert item["status"] == "incomplete"
            kept = item["content"][0]["text"]
            if recorded_first:
                assert kept == reply_text(received)
            else:
                # The deltas sent after the last checkpoint are in no log, and
                # the transcript that had them is gone (docs/protocol.md).
                assert reply_text(received).startswith(kept)
            assert_in_order_once(received)
            await ask(second, "still there?")
            after = await read_until_done(second)
            assert after[-1]["response"]["status"] == "completed"
        log = await whole_log(stack, session_id)
        if recorded_first:
            assert log[: len(received)] == received
        else:
            ids = {event["event_id"] for event in received}
            assert [e for e in received if e in log] == [e for e in log if e["event_id"] in ids]
    finally:
        stack.restart("gateway")


async def test_a_second_connection_takes_the_session_over(stack: Stack) -> None:
    """A client whose old connection still looks open resumes elsewhere: the old
    connection is told `session_taken_over` and closed with 4509."""
    async with open_client(stack, 0) as old:
        created = orjson.loads(await old.recv())
        async with open_client(
            stack, 1, session_id=created["session"]["id"], last_event_id=created["event_id"]
        ) as new:
            error = orjson.loads(await asyncio.wait_for(old.recv(), 10))
            assert error["type"] == "error"
            assert error["error"]["code"] == "session_taken_over"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(old.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4509
            client = RealtimeClient(new)
            await ask(client, "on the new connection")
            assert (await read_until_done(client))[-1]["response"]["status"] == "completed"


async def test_renewals_batched_per_gateway_hand_each_connection_its_own_outcome(
    stack: Stack,
) -> None:
    """Six idle connections on one gateway, their leases renewed in one batch a
    tick: one session resumed elsewhere, one gone from the store. Exactly those
    two connections close (4509, 4504); the other four keep their sessions."""
    async with contextlib.AsyncExitStack() as opened:
        sockets = [await opened.enter_async_context(open_client(stack, 0)) for _ in range(6)]
        created = [orjson.loads(await socket.recv()) for socket in sockets]
        sessions = [event["session"]["id"] for event in created]
        taken, gone = 1, 4
        resumer = await opened.enter_async_context(
            open_client(
                stack, 1, session_id=sessions[taken], last_event_id=created[taken]["event_id"]
            )
        )
        redis = Redis.from_url(stack.redis_url or f"redis://127.0.0.1:{stack.ports.redis}/0")
        try:
            await redis.delete(*[f"sb:{{dev:{sessions[gone]}}}:{key}" for key in KEYS])
        finally:
            await redis.aclose()
        for index, code, close in (
            (taken, "session_taken_over", 4509),
            (gone, "session_not_found", 4504),
        ):
            error = orjson.loads(await asyncio.wait_for(sockets[index].recv(), 10))
            assert (error["type"], error["error"]["code"]) == ("error", code)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(sockets[index].recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == close
        # Several renewal ticks later, the others still hold their sessions:
        # their responses are recorded (an append without the lease is refused)
        # and nothing else reached them.
        for index in (0, 2, 3, 5):
            client = RealtimeClient(sockets[index])
            await ask(client, f"still mine {index}")
            events = await read_until_done(client)
            assert [e for e in events if e["type"] == "error"] == []
            assert events[-1]["response"]["status"] == "completed"
        client = RealtimeClient(resumer)
        await ask(client, "on the new connection")
        assert (await read_until_done(client))[-1]["response"]["status"] == "completed"
