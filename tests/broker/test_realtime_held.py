"""Held voice sessions without a network: event numbering, the replay buffer, and a
`HeldSession` over a fake upstream socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from switchboard.broker import realtime_held
from switchboard.broker.realtime_held import HeldSession, ReplayBuffer, SessionEnds, number_event
from switchboard.broker.realtime_upstream import UpstreamClosed
from switchboard.errors import SwitchboardError
from switchboard.v1 import common_pb2, realtime_pb2


def audio(seq: int, size: int = 5000) -> bytes:
    body = {"type": "response.output_audio.delta", "event_id": "event_up", "delta": "A" * size}
    return number_event(orjson.dumps(body), seq)


def text(seq: int, kind: str = "response.output_audio_transcript.delta") -> bytes:
    return number_event(orjson.dumps({"type": kind, "event_id": "event_up", "delta": "hi"}), seq)


def test_events_get_the_id_of_their_seq_small_or_large() -> None:
    assert orjson.loads(text(26))["event_id"] == "event_v1a"
    large = orjson.loads(audio(255))
    assert large["event_id"] == "event_v" + "ff"
    assert large["delta"] == "A" * 5000
    # An event without an id gets one; an error's own nested event_id is kept.
    assert orjson.loads(number_event(b'{"type":"x"}', 1)) == {"type": "x", "event_id": "event_v1"}
    nested = b'{"type":"error","error":{"event_id":"evt_client"},"event_id":"event_up"}'
    numbered = orjson.loads(number_event(nested, 2))
    assert (numbered["event_id"], numbered["error"]["event_id"]) == ("event_v2", "evt_client")
    missing = b'{"type":"response.output_audio.delta","delta":"' + b"A" * 5000 + b'"}'
    assert orjson.loads(number_event(missing, 3))["event_id"] == "event_v3"
    # A small audio delta is numbered in place too (not parsed), with the same result.
    small = orjson.loads(audio(4, size=8))
    assert (small["event_id"], small["delta"]) == ("event_v4", "A" * 8)
    assert orjson.loads(number_event(missing[:60] + b'"}', 5))["event_id"] == "event_v5"


def test_the_buffer_replays_after_a_seq_and_gives_up_audio_first() -> None:
    buffer = ReplayBuffer(max_bytes=12_000)
    buffer.add(1, text(1))
    buffer.add(2, audio(2))
    buffer.add(3, text(3))
    events, lost = buffer.after(1)
    assert [seq for seq, _ in events] == [2, 3] and not lost
    buffer.add(4, audio(4))
    buffer.add(5, audio(5))  # over the bound: the oldest audio (2) goes
    events, lost = buffer.after(1)
    assert [seq for seq, _ in events] == [3, 4, 5] and lost
    events, lost = buffer.after(2)
    assert [seq for seq, _ in events] == [3, 4, 5] and not lost
    assert buffer.size <= buffer.max_bytes


def test_the_buffer_refuses_a_seq_never_sent_or_no_longer_kept() -> None:
    buffer = ReplayBuffer(max_bytes=200)
    for seq in range(1, 10):
        buffer.add(seq, text(seq))
    assert buffer.after(9) == ([], False)
    for after in (10, 0):
        with pytest.raises(SwitchboardError) as refused:
            buffer.after(after)
        assert refused.value.code == common_pb2.ERROR_CODE_RESUME_UNAVAILABLE
        assert refused.value.param == "last_event_id"


class FakeUpstream:
    """An upstream socket whose events the test sends (recv/send/close only)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[Any] = []
        self.closed = asyncio.Event()

    async def recv(self, decode: bool = False) -> bytes:
        event = await self.incoming.get()
        if event is None:
            raise UpstreamClosed("closed")
        return event

    async def send(self, message: bytes | str, text: bool = True) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        self.closed.set()
        self.incoming.put_nowait(None)


async def test_a_caller_that_falls_far_behind_is_cut_and_the_session_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(realtime_held, "FOLLOWER_MAX_BYTES", 30_000)
    upstream = FakeUpstream()
    outcomes: list[str] = []

    async def on_end(_held: HeldSession, outcome: str) -> None:
        outcomes.append(outcome)

    held = HeldSession(
        ("acme", "sess_1"),
        upstream,
        hold_s=0.2,
        replay_max_bytes=1_000_000,
        ends=SessionEnds({}),
        rewrite=lambda frame: frame,
        on_end=on_end,
    )
    held.start(b'{"type":"session.created","session":{}}')
    requests: asyncio.Queue[Any] = asyncio.Queue()

    async def request_stream() -> AsyncIterator[Any]:
        while (request := await requests.get()) is not None:
            yield request

    opened = realtime_pb2.RealtimeResponse(opened=realtime_pb2.RealtimeOpened())
    following = held.follow(request_stream(), 0, lambda _lost: opened)
    assert (await anext(following)).WhichOneof("kind") == "opened"
    # The caller reads nothing while 10 audio deltas of 5 kB arrive.
    for _ in range(10):
        upstream.incoming.put_nowait(audio(0))
    await asyncio.sleep(0.05)

    async def rest() -> list[Any]:
        return [response async for response in following]

    responses = await asyncio.wait_for(rest(), 5)
    assert responses[-1].failure.code == common_pb2.ERROR_CODE_SLOW_CONSUMER
    assert held.follower is None
    # Held, then closed when the hold runs out.
    await asyncio.wait_for(upstream.closed.wait(), 5)
    await held.wait_ended()
    assert outcomes == ["hold_expired"]
