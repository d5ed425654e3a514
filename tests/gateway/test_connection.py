"""The connection pump in-process: a client socket in memory, the gateway's
in-memory backends, real tenant limits in a real Redis. Recording before
sending, slow consumers, drain, leaving mid-turn, hand-over, refusals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from switchboard.config import GatewaySettings
from switchboard.gateway import connection as connection_module
from switchboard.gateway import turns
from switchboard.gateway.connection import RealtimeConnection
from switchboard.gateway.eventlog import EventRecorder
from switchboard.gateway.leases import LeaseRenewals
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.testing import (
    Fail,
    Finish,
    MemoryBackends,
    MemorySocket,
    Script,
    Text,
    Wait,
    eventually,
    reply,
)
from switchboard.limits import TenantLimiter
from switchboard.redis_client import any_client
from switchboard.tenancy import Tenant
from switchboard.v1 import session_pb2
from tools.redis_server import RedisServer

Event = dict[str, Any]

USER_SAYS = {
    "type": "conversation.item.create",
    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
}


@dataclass
class Client:
    socket: MemorySocket
    connection: RealtimeConnection
    backends: MemoryBackends
    task: asyncio.Task[None]
    tenant: Tenant

    @property
    def session_id(self) -> str:
        return self.connection.session_id

    def logged(self) -> list[Event]:
        return self.backends.logged(self.tenant.id, self.session_id)


@pytest.fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Any]:
    redis = any_client(redis_server.url, cluster=False)
    clients: list[Client] = []

    async def open_(
        tenant: Tenant | None = None, scripts: tuple[Script, ...] = (), **env: str
    ) -> Client:
        tenant = tenant or Tenant(f"conn-{len(clients)}-{id(clients)}")
        settings = GatewaySettings.from_environ(
            {
                "SWITCHBOARD_GATEWAY_DISCONNECT_GRACE_S": "5",
                "SWITCHBOARD_GATEWAY_SESSION_LEASE_S": "0.6",
                "SWITCHBOARD_GATEWAY_MAX_BUFFERED_BYTES": "16384",
                **env,
            }
        )
        backends = MemoryBackends()
        backends.model.queue(*scripts)
        config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
        session = await backends.create_session(tenant.id, config)
        protocol = RealtimeProtocol(
            session_id=session.id, config=config, max_event_bytes=settings.max_event_bytes
        )
        protocol.open()
        socket = MemorySocket()
        connection = RealtimeConnection(
            socket,
            protocol,
            backends,
            tenant,
            TenantGate(TenantLimiter(redis), reserve_output_tokens=100),
            GatewayMetrics(),
            EventRecorder(backends),
            LeaseRenewals(backends, settings.session_lease_s),
            settings,
            holder=f"conn_{len(clients)}",
        )
        client = Client(socket, connection, backends, asyncio.create_task(connection.run()), tenant)
        clients.append(client)
        assert (await socket.next_event())["type"] == "session.created"
        return client

    yield open_
    for client in clients:
        client.socket.resume()
        client.socket.leave()
        client.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client.task
    await redis.aclose()


async def test_every_event_is_recorded_before_it_is_sent(connect: Any) -> None:
    client = await connect(scripts=(reply("Hi", " there."),))
    client.socket.send(USER_SAYS)
    client.socket.send({"type": "response.create"})
    await client.socket.until("response.done")
    sent = [event["event_id"] for event in client.socket.sent]
    logged = [event["event_id"] for event in client.logged()]
    assert sent == logged[: len(sent)]
    assert [e["type"] for e in client.logged()].count("response.done") == 1


def user_says(item_id: str) -> Event:
    return {**USER_SAYS, "item": {**USER_SAYS["item"], "id": item_id}}


async def test_a_response_right_after_an_item_starts_from_the_context_read_with_it(
    connect: Any,
) -> None:
    release = asyncio.Event()
    client = await connect(
        scripts=(reply("One."), Script([Text("Two"), Wait(release), Finish()]), reply("Three."))
    )
    backends, socket = client.backends, client.socket

    def context_ids(n: int) -> list[str]:
        return [item.id for item in backends.model.requests[n].context.items]

    # The item and then the response: the context came with the item's append.
    socket.send(user_says("item_u1"))
    socket.send({"type": "response.create"})
    await socket.until("response.done")
    assert backends.calls["build_context"] == 0
    assert context_ids(0) == ["item_u1"]
    (answer,) = [item.id for item in client.backends.items(client.tenant.id, client.session_id)][1:]
    # An item stored while a turn runs: the turn stores its output after it, so
    # the next response reads its own context, with that output in it.
    socket.send({"type": "response.create"})
    await socket.next_event("response.output_text.delta")
    socket.send(user_says("item_u2"))
    await socket.until("conversation.item.done")
    release.set()
    await socket.until("response.done")
    socket.send({"type": "response.create"})
    await socket.until("response.done")
    assert backends.calls["build_context"] == 2
    second_answer = context_ids(2)[3]
    assert context_ids(2) == ["item_u1", answer, "item_u2", second_answer]
    # Any other command between the item and the response: the context is read again.
    socket.send(user_says("item_u3"))
    socket.send({"type": "conversation.item.delete", "item_id": "item_u1"})
    socket.send({"type": "response.create"})
    await socket.until("response.done")
    assert backends.calls["build_context"] == 3
    assert "item_u1" not in context_ids(3) and context_ids(3)[-1] == "item_u3"


async def test_a_history_seeded_item_by_item_reads_the_context_once(connect: Any) -> None:
    client = await connect(scripts=(reply("Seen."),))
    backends, socket = client.backends, client.socket
    seeded = [f"item_h{n}" for n in range(6)]
    for item_id in seeded:
        socket.send(user_says(item_id))
    socket.send({"type": "response.create"})
    await socket.until("response.done")
    # The first item of the run read the context along; the next five did not,
    # and the response read its own, with all six in it.
    assert backends.calls["append_item_with_context"] == 1
    assert backends.calls["build_context"] == 1
    assert [item.id for item in backends.model.requests[0].context.items] == seeded
    # An item after the response starts a new run: it reads the context again.
    socket.send(user_says("item_next"))
    socket.send({"type": "response.create"})
    await socket.until("response.done")
    assert backends.calls["append_item_with_context"] == 2
    assert backends.calls["build_context"] == 1


async def test_with_checkpoints_deltas_go_out_at_once_and_the_rest_after_all_is_logged(
    connect: Any,
) -> None:
    pause, more = asyncio.Event(), asyncio.Event()
    script = Script([Text("Hi"), Wait(pause), Text(" there"), Wait(more), Text("!"), Finish()])
    client = await connect(scripts=(script,), SWITCHBOARD_GATEWAY_CHECKPOINT_S="0.1")
    # At each send: the event, and whether the log then held every event sent so far.
    sends: list[tuple[Event, bool]] = []
    send_text = client.socket.send_text

    async def watched(data: str) -> None:
        logged = {e["event_id"] for e in client.logged()}
        event = orjson.loads(data)
        sent = [e["event_id"] for e in client.socket.sent] + [event["event_id"]]
        sends.append((event, all(event_id in logged for event_id in sent)))
        await send_text(data)

    client.socket.send_text = watched  # type: ignore[method-assign]
    client.socket.send(USER_SAYS)
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    pause.set()
    # A delta alone in its batch goes out before it is recorded.
    await client.socket.next_event("response.output_text.delta")
    assert sends[-1][0]["delta"] == " there" and not sends[-1][1]
    more.set()
    await client.socket.until("response.done")
    for event, all_logged in sends:
        assert all_logged or event["type"] == "response.output_text.delta", event["type"]
    sent = [event["event_id"] for event in client.socket.sent]
    logged = [event["event_id"] for event in client.logged()]
    assert sent == logged[: len(sent)]
    assert [e["type"] for e in client.logged()].count("response.done") == 1


async def test_a_delta_sent_at_once_is_recorded_at_the_next_checkpoint(connect: Any) -> None:
    release = asyncio.Event()
    client = await connect(
        scripts=(Script([Text("a"), Wait(release), Finish()]),),
        SWITCHBOARD_GATEWAY_CHECKPOINT_S="0.1",
    )
    client.socket.send({"type": "response.create"})
    delta = await client.socket.next_event("response.output_text.delta")
    # Nothing else is sent meanwhile: the checkpoint's clock records it.
    await eventually(lambda: delta["event_id"] in [e["event_id"] for e in client.logged()])
    release.set()
    await client.socket.next_event("response.done")


@pytest.fixture
def long_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds that no clock ends within a test: only what the connection does ends them."""
    monkeypatch.setattr(connection_module, "BEFORE_OUTPUT_S", 600.0)
    monkeypatch.setattr(turns, "NOTE_BROKER_WAIT_S", 600.0)


def watch_appends(client: Client) -> list[session_pb2.AppendEventsRequest]:
    """The appends of the client's session, as the session service gets them."""
    appends: list[session_pb2.AppendEventsRequest] = []
    append_events_batch = client.backends.append_events_batch

    async def watched(
        batch: session_pb2.AppendEventsBatchRequest,
    ) -> session_pb2.AppendEventsBatchResponse:
        appends.extend(a for a in batch.appends if a.session_id == client.session_id)
        return await append_events_batch(batch)

    client.backends.append_events_batch = watched  # type: ignore[method-assign]
    return appends


async def test_a_responses_first_events_are_recorded_with_its_first_output(
    connect: Any, long_holds: None
) -> None:
    first, release = asyncio.Event(), asyncio.Event()
    client = await connect(scripts=(Script([Wait(first), Text("Hi"), Wait(release), Finish()]),))
    appends = watch_appends(client)
    client.socket.send(USER_SAYS)
    client.socket.send({"type": "response.create"})
    # The model call runs, and nothing of the item or the response is recorded
    # or sent until its first output.
    await eventually(lambda: len(client.backends.model.requests) == 1)
    await asyncio.sleep(0.05)
    assert appends == [] and [e["type"] for e in client.socket.sent] == ["session.created"]
    first.set()
    await client.socket.next_event("response.output_text.delta")
    kinds = [orjson.loads(event.payload)["type"] for event in appends[0].events]
    assert kinds[:3] == ["conversation.item.added", "conversation.item.done", "response.created"]
    assert kinds[-1] == "response.output_text.delta"
    # The broker holding the call is noted with them, not in an append of its own.
    assert appends[0].broker_response_id == appends[0].open_response_id
    assert appends[0].broker_address == "broker-a:50052"
    release.set()
    await client.socket.until("response.done")
    sent = [event["event_id"] for event in client.socket.sent]
    logged = [event["event_id"] for event in client.logged()]
    assert sent == logged[: len(sent)]
    assert all(not a.broker_response_id for a in appends[1:])


async def test_held_events_go_out_when_no_response_follows_or_it_ends(
    connect: Any, long_holds: None
) -> None:
    client = await connect(scripts=(Script([Fail("upstream_stream_broken")]),))
    # An item with nothing behind it: its events go when the reader finds no frame.
    client.socket.send(user_says("item_alone"))
    assert (await client.socket.next_event())["type"] == "conversation.item.added"
    assert (await client.socket.next_event())["type"] == "conversation.item.done"
    # An item with another command behind it: that command lets its events go.
    client.socket.send(USER_SAYS)
    client.socket.send({"type": "conversation.item.retrieve", "item_id": "nope"})
    assert (await client.socket.next_event())["type"] == "conversation.item.added"
    assert (await client.socket.next_event())["type"] == "conversation.item.done"
    assert (await client.socket.next_event())["error"]["code"] == "item_not_found"
    # A response that fails before any output: its events go out as it ends.
    client.socket.send({"type": "response.create"})
    assert (await client.socket.next_event())["type"] == "response.created"
    done = (await client.socket.until("response.done"))[-1]["response"]
    assert done["status"] == "failed"
    sent = [event["event_id"] for event in client.socket.sent]
    logged = [event["event_id"] for event in client.logged()]
    assert sent == logged[: len(sent)]


async def test_bad_frames_get_errors_and_the_connection_goes_on(connect: Any) -> None:
    client = await connect()
    client.socket.send_raw(data=b"\x00\x01")
    assert (await client.socket.next_event("error"))["error"]["code"] == "binary_frame_unsupported"
    client.socket.send({"type": "conversation.item.retrieve", "item_id": "nope"})
    assert (await client.socket.next_event("error"))["error"]["code"] == "item_not_found"
    client.socket.send(USER_SAYS)
    assert (await client.socket.next_event("conversation.item.done"))["item"]["role"] == "user"


async def test_a_client_cancel_ends_the_response_cancelled(connect: Any) -> None:
    release = asyncio.Event()
    client = await connect(scripts=(Script([Text("a"), Wait(release), Finish()]),))
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    client.socket.send({"type": "response.cancel"})
    done = (await client.socket.next_event("response.done"))["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")


async def test_a_slow_consumer_is_cut_with_4008_and_its_stream_is_recorded(connect: Any) -> None:
    chunk = "x" * 200
    client = await connect(scripts=(Script([*(Text(chunk) for _ in range(300)), Finish()]),))
    client.socket.pause()
    client.socket.send({"type": "response.create"})
    await eventually(lambda: client.connection.end_reason == "slow_consumer")
    client.socket.resume()
    assert await client.socket.wait_closed() == (4008, "slow_consumer")
    # Cut, not lost: the whole response is in the log for a resume.
    await eventually(lambda: "response.done" in [e["type"] for e in client.logged()])
    text = "".join(e["delta"] for e in client.logged() if e["type"] == "response.output_text.delta")
    assert text == chunk * 300
    await asyncio.wait_for(client.task, 5)


async def test_a_draining_connection_closes_with_1012_after_its_turn(connect: Any) -> None:
    release = asyncio.Event()
    client = await connect(scripts=(Script([Text("a"), Wait(release), Text("b"), Finish()]),))
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    client.connection.drain()
    await asyncio.sleep(0.05)
    assert client.socket.closed is None  # the running response goes on
    release.set()
    assert (await client.socket.next_event("response.done"))["response"]["status"] == "completed"
    assert await client.socket.wait_closed() == (1012, "draining")


async def test_past_the_drain_deadline_the_response_ends_cancelled(connect: Any) -> None:
    client = await connect(scripts=(Script([Text("a"), Wait(asyncio.Event()), Finish()]),))
    client.socket.send({"type": "response.create"})
    done_event = await client.socket.next_event("response.created")
    response_id = done_event["response"]["id"]
    client.connection.drain()
    client.connection.stop_now()
    done = (await client.socket.next_event("response.done"))["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "drain")
    assert await client.socket.wait_closed() == (1012, "draining")
    assert client.backends.model.cancelled == [response_id]


async def test_a_client_that_leaves_mid_turn_gets_its_response_recorded(connect: Any) -> None:
    release = asyncio.Event()
    client = await connect(scripts=(Script([Text("a"), Wait(release), Text("b"), Finish()]),))
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    client.socket.leave()
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(client.task, 5)
    logged = client.logged()
    assert logged[-1]["type"] == "response.done"
    assert logged[-1]["response"]["status"] == "completed"
    assert "response.done" not in [e["type"] for e in client.socket.sent]  # nobody to send to
    assert client.backends.model.cancelled == []


async def test_past_the_disconnect_grace_the_response_ends_cancelled(connect: Any) -> None:
    client = await connect(
        scripts=(Script([Text("a"), Wait(asyncio.Event()), Finish()]),),
        SWITCHBOARD_GATEWAY_DISCONNECT_GRACE_S="0.1",
    )
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    client.socket.leave()
    await asyncio.wait_for(client.task, 5)
    done = client.logged()[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == (
        "cancelled",
        "client_disconnected",
    )
    assert client.backends.model.cancelled == [done["id"]]


async def test_a_session_resumed_elsewhere_is_handed_over_with_4509(connect: Any) -> None:
    client = await connect()
    claim = await client.backends.claim_session(
        client.tenant.id, client.session_id, "conn_elsewhere", 600
    )
    assert not claim.claimed
    error = await client.socket.next_event("error")
    assert error["error"]["code"] == "session_taken_over"
    assert await client.socket.wait_closed() == (4509, "session_taken_over")
    await asyncio.wait_for(client.task, 5)
    assert client.connection.end_reason == "taken_over"
    # The error is the displaced client's alone: a resume replays the log, so it
    # must not be in it.
    assert [e["type"] for e in client.logged()] == ["session.created"]


async def test_a_session_resumed_mid_turn_is_handed_over_after_it_unrecorded(
    connect: Any,
) -> None:
    release = asyncio.Event()
    client = await connect(scripts=(Script([Text("a"), Wait(release), Text("b"), Finish()]),))
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    claim = await client.backends.claim_session(
        client.tenant.id, client.session_id, "conn_elsewhere", 600
    )
    assert not claim.claimed
    # The lease renewal sees the request; the hand-over waits for the turn.
    await eventually(lambda: client.connection.end_reason == "taken_over")
    release.set()
    await client.socket.until("response.done")
    error = await client.socket.next_event("error")
    assert error["error"]["code"] == "session_taken_over"
    assert await client.socket.wait_closed() == (4509, "session_taken_over")
    logged = [e["type"] for e in client.logged()]
    assert logged[-1] == "response.done"
    assert "error" not in logged


async def test_a_streaming_turn_renews_its_lease_by_its_appends_and_hands_over_after_it(
    connect: Any,
) -> None:
    steps = [asyncio.Event() for _ in range(30)]
    deltas = [step for event in steps for step in (Wait(event), Text("b"))]
    # A 3 s lease: renewals every 1 s, so only a one-second stall between two
    # deltas (0.1 s apart) would let a claim through: not a quiet-machine test.
    client = await connect(
        scripts=(Script([Text("a"), *deltas, Finish()]),), SWITCHBOARD_GATEWAY_SESSION_LEASE_S="3"
    )
    client.socket.send({"type": "response.create"})
    await client.socket.next_event("response.output_text.delta")
    renewals = client.backends.calls["claim_sessions_batch"]
    # A resume elsewhere asks for the session while the response streams.
    elsewhere = await client.backends.claim_session(
        client.tenant.id, client.session_id, "conn_elsewhere", 600
    )
    assert not elsewhere.claimed
    for event in steps:  # a delta every 0.1 s for 3 s: 3 renewal intervals (1 s)
        await asyncio.sleep(0.1)
        event.set()
    done = await client.socket.next_event("response.done")
    assert done["response"]["status"] == "completed"
    # The appends kept the lease: at most the one renewal of the first interval.
    assert client.backends.calls["claim_sessions_batch"] - renewals <= 1
    error = await client.socket.next_event("error")
    assert error["error"]["code"] == "session_taken_over"
    assert await client.socket.wait_closed() == (4509, "session_taken_over")


async def test_a_spent_budget_closes_the_connection_with_4529(connect: Any) -> None:
    client = await connect(Tenant(f"budget-{id(connect)}", daily_token_budget=1))
    client.socket.send({"type": "response.create"})
    done = (await client.socket.next_event("response.done"))["response"]
    assert done["status_details"]["error"]["code"] == "insufficient_quota"
    assert await client.socket.wait_closed() == (4529, "insufficient_quota")


async def test_a_connection_whose_session_vanished_closes_with_4504(connect: Any) -> None:
    # The session store lost the session (a Redis restarted without its data):
    # the next event is answered `session_not_found`, then the connection ends
    # with the documented terminal close, instead of refusing every event.
    client = await connect()
    client.backends.forget(client.tenant.id, client.session_id)
    client.socket.send({**USER_SAYS, "event_id": "evt_1"})
    error = await client.socket.next_event("error")
    assert (error["error"]["code"], error["error"]["event_id"]) == ("session_not_found", "evt_1")
    assert await client.socket.wait_closed() == (4504, "session_not_found")


async def test_an_idle_connection_whose_session_vanished_closes_with_4504(connect: Any) -> None:
    # Found by the lease renewal, without a client event.
    client = await connect()
    client.backends.forget(client.tenant.id, client.session_id)
    error = await client.socket.next_event("error")
    assert error["error"]["code"] == "session_not_found"
    assert await client.socket.wait_closed() == (4504, "session_not_found")
