"""The Python SDK's pure parts (backoff, the event tracker) and its reading of
closes and refusals, against a small real WebSocket server scripted per test."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from switchboard import errors as server_errors
from switchboard_client import (
    Backoff,
    ConnectionState,
    GaveUp,
    QuotaExceeded,
    RealtimeClient,
    SessionTakenOver,
    StateChange,
)
from switchboard_client.errors import close_is_terminal
from switchboard_client.tracker import EventTracker

# --- backoff ---------------------------------------------------------------------------


def test_full_jitter_delays_are_bounded_and_spread() -> None:
    seed = random.randrange(1 << 30)
    backoff = Backoff(base_s=0.5, max_s=8.0, rng=random.Random(seed))
    for retry in range(8):
        cap = backoff.cap(retry)
        assert cap == min(8.0, 0.5 * 2**retry)
        delays = [backoff.delay(retry) for _ in range(2000)]
        assert all(0.0 <= d <= cap for d in delays), seed
        # Spread over the whole range, not bunched: uniform has mean cap/2 and
        # standard deviation cap/sqrt(12); each decile holds about a tenth.
        assert abs(statistics.fmean(delays) - cap / 2) < 0.05 * cap, seed
        assert abs(statistics.pstdev(delays) - cap / 12**0.5) < 0.05 * cap, seed
        deciles = [
            sum(1 for d in delays if k * cap / 10 <= d < (k + 1) * cap / 10) for k in range(10)
        ]
        assert min(deciles) > 120, (seed, deciles)


def test_a_suggested_delay_is_a_floor_capped_by_the_maximum() -> None:
    backoff = Backoff(base_s=0.1, max_s=5.0, rng=random.Random(1))
    assert all(backoff.delay(0, suggested_s=2.0) >= 2.0 for _ in range(100))
    assert all(backoff.delay(0, suggested_s=60.0) == 5.0 for _ in range(100))
    assert Backoff(max_attempts=3).exhausted(3) and not Backoff(max_attempts=None).exhausted(10**6)


def test_the_sdk_reads_close_codes_as_the_server_catalogue_does() -> None:
    for code in (
        1000,
        1006,
        1007,
        1008,
        1009,
        1011,
        1012,
        1013,
        4008,
        4010,
        4011,
        4499,
        4500,
        4501,
        4503,
        4504,
        4509,
        4529,
        4999,
    ):
        assert close_is_terminal(code) == server_errors.close_is_terminal(code), code
    assert not close_is_terminal(None)  # dropped without a close frame


# --- the tracker -----------------------------------------------------------------------


def delta(n: int, text: str) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "event_id": f"e{n}",
        "response_id": "r1",
        "delta": text,
    }


def test_the_tracker_delivers_each_event_once_and_marks_a_lost_response_resumed() -> None:
    tracker = EventTracker()
    created = {"type": "session.created", "event_id": "e1", "session": {"id": "sess_1"}}
    started = {"type": "response.created", "event_id": "e2", "response": {"id": "r1"}}
    assert tracker.accept(created) is not None and tracker.session_id == "sess_1"
    assert tracker.accept(started) is not None
    assert tracker.accept(delta(3, "a")) is not None
    tracker.connection_lost()
    # A server that replays too much: the repeats are dropped, and counted.
    assert tracker.accept(delta(3, "a")) is None
    assert tracker.accept(delta(4, "b")) is not None
    done = tracker.accept(
        {
            "type": "response.done",
            "event_id": "e5",
            "response": {"id": "r1", "status": "completed", "output": []},
        }
    )
    assert done is not None and done.response is not None
    assert (done.response.text, done.response.resumed, done.response.interrupted) == (
        "ab",
        True,
        False,
    )
    assert tracker.duplicates == 1 and tracker.last_event_id == "e5"


def test_a_response_the_server_could_not_finish_is_marked_interrupted() -> None:
    tracker = EventTracker()
    tracker.accept({"type": "response.created", "event_id": "e1", "response": {"id": "r1"}})
    tracker.connection_lost()
    done = tracker.accept(
        {
            "type": "response.done",
            "event_id": "e2",
            "response": {
                "id": "r1",
                "status": "failed",
                "status_details": {"error": {"code": "response_interrupted"}},
            },
        }
    )
    assert done is not None and done.response is not None
    assert done.response.interrupted and not done.response.resumed


def test_unanswered_client_events_are_known_after_the_sync() -> None:
    tracker = EventTracker()
    item = {"type": "conversation.item.create", "event_id": "c1", "item": {"id": "item_1"}}
    tracker.sent(item)
    tracker.sent({"type": "response.create", "event_id": "c2"})
    sync = tracker.sync_event()
    assert not tracker.synced
    # The replay shows the item arrived; the sync's answer is not delivered.
    tracker.accept({"type": "conversation.item.added", "event_id": "e1", "item": {"id": "item_1"}})
    answer = {
        "type": "error",
        "event_id": "e2",
        "error": {"code": "item_not_found", "event_id": sync["event_id"]},
    }
    assert tracker.accept(answer) is None
    assert tracker.synced
    assert [e["event_id"] for e in tracker.unanswered()] == ["c2"]


# --- closes and refusals, against a scripted server ------------------------------------

Handler = Callable[[ServerConnection], Awaitable[None]]


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    servers = []

    async def start(
        handler: Handler, refuse: Callable[[int], Response | None] = lambda n: None
    ) -> str:
        attempts = 0

        def process_request(connection: ServerConnection, request: Request) -> Response | None:
            nonlocal attempts
            attempts += 1
            return refuse(attempts)

        instance = await serve(handler, "127.0.0.1", 0, process_request=process_request)
        servers.append(instance)
        port = instance.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/realtime"

    yield start
    for instance in servers:
        instance.close()
        await instance.wait_closed()


async def session_then_close(code: int, reason: str) -> Handler:
    async def handler(connection: ServerConnection) -> None:
        await connection.send(
            json.dumps({"type": "session.created", "event_id": "e1", "session": {"id": "sess_1"}})
        )
        await connection.close(code, reason)

    return handler


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        (4529, "insufficient_quota", QuotaExceeded),
        (4509, "session_taken_over", SessionTakenOver),
    ],
)
async def test_a_terminal_close_is_not_retried(
    server: Any, code: int, reason: str, error: type[Exception]
) -> None:
    url = await server(await session_then_close(code, reason))
    states: list[StateChange] = []
    async with RealtimeClient(url, api_key="k", on_state=states.append) as client:
        with pytest.raises(error) as raised:
            async for _ in client.events():
                pass
    assert raised.value.close_code == code  # type: ignore[attr-defined]
    assert client.connections == 1
    assert states[-1].state is ConnectionState.CLOSED and states[-1].error is raised.value


async def test_a_resumable_close_resumes_from_the_last_event(server: Any) -> None:
    paths: list[str] = []

    async def handler(connection: ServerConnection) -> None:
        assert connection.request is not None
        paths.append(connection.request.path)
        if len(paths) == 1:
            await connection.send(
                json.dumps(
                    {"type": "session.created", "event_id": "e1", "session": {"id": "sess_1"}}
                )
            )
            await connection.close(4008, "slow_consumer")
        else:
            await connection.send(
                json.dumps({"type": "response.created", "event_id": "e2", "response": {"id": "r"}})
            )
            await connection.close(4529, "insufficient_quota")

    url = await server(handler)
    async with RealtimeClient(url, api_key="k", backoff=Backoff(base_s=0.01)) as client:
        with pytest.raises(QuotaExceeded):
            async for _ in client.events():
                pass
    assert "session_id=sess_1" in paths[1] and "last_event_id=e1" in paths[1]


async def test_retry_after_is_honoured_and_attempts_are_bounded(server: Any) -> None:
    async def never(connection: ServerConnection) -> None:
        raise AssertionError("refused before")

    def busy(attempt: int) -> Response:
        return Response(
            503,
            "Service Unavailable",
            Headers({"Retry-After": "0.3"}),
            b'{"error": {"code": "server_busy", "message": "draining"}}',
        )

    url = await server(never, busy)
    states: list[StateChange] = []
    client = RealtimeClient(
        url,
        api_key="k",
        on_state=states.append,
        backoff=Backoff(base_s=0.01, max_s=1.0, max_attempts=3),
    )
    with pytest.raises(GaveUp) as gave_up:
        await client.connect()
    assert gave_up.value.attempts == 3
    waits = [s.delay_s for s in states if s.state is ConnectionState.CONNECTING and s.attempt > 1]
    assert len(waits) == 2 and all(w >= 0.3 for w in waits)
    assert all(
        s.reason == "server_busy"
        for s in states
        if s.attempt > 1 and s.state is ConnectionState.CONNECTING
    )
    await client.close()
    await asyncio.sleep(0)
