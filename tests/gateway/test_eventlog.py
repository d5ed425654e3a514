"""The gateway's shared event-log batches (`EventRecorder`): appends written in
place into the batch that goes next, split by count and bytes, errors per append."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.eventlog import EventRecorder
from switchboard.v1 import common_pb2, session_pb2


class HeldSession:
    """`append_events_batch` only: keeps each batch until released; refuses the
    appends of session "taken"."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, list[bytes]]]] = []
        self.release = asyncio.Event()

    async def append_events_batch(
        self, request: session_pb2.AppendEventsBatchRequest
    ) -> session_pb2.AppendEventsBatchResponse:
        self.batches.append(
            [(a.session_id, [e.payload for e in a.events]) for a in request.appends]
        )
        await self.release.wait()
        reply = session_pb2.AppendEventsBatchResponse()
        for append in request.appends:
            if append.session_id == "taken":
                reply.results.add(
                    error_code=common_pb2.ERROR_CODE_SESSION_TAKEN_OVER, error_message="taken"
                )
            else:
                reply.results.add(last_seq=len(append.events))
        return reply


def recorder_of(session: HeldSession, **kwargs: Any) -> EventRecorder:
    return EventRecorder(cast(Backends, session), max_in_flight=1, **kwargs)


def append(recorder: EventRecorder, session_id: str, *payloads: bytes) -> asyncio.Task[None]:
    def fill(request: session_pb2.AppendEventsRequest) -> int:
        request.session_id = session_id
        for number, payload in enumerate(payloads, 1):
            request.events.add(seq=number, event_id=f"e{number}", payload=payload)
        return sum(map(len, payloads))

    return asyncio.ensure_future(recorder.append_with(fill))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_appends_made_while_a_batch_is_out_go_together_in_order() -> None:
    session = HeldSession()
    recorder = recorder_of(session)
    try:
        first = append(recorder, "a", b"1")
        await settle()
        later = [append(recorder, name, b"2", b"3") for name in ("b", "c", "taken")]
        await settle()
        assert session.batches == [[("a", [b"1"])]]
        session.release.set()
        await asyncio.gather(first, *later[:2])
        with pytest.raises(SessionTakenOver):
            await later[2]
        assert session.batches[1] == [
            ("b", [b"2", b"3"]),
            ("c", [b"2", b"3"]),
            ("taken", [b"2", b"3"]),
        ]
    finally:
        await recorder.close()


async def test_a_batch_is_split_by_count_and_by_bytes() -> None:
    session = HeldSession()
    recorder = recorder_of(session, max_batch=2, max_batch_bytes=10)
    try:
        first = append(recorder, "a", b"x")
        await settle()
        later = [
            append(recorder, "b", b"x"),
            append(recorder, "c", b"x"),  # the count: a batch of two
            append(recorder, "d", b"123456"),
            append(recorder, "e", b"123456"),  # over 10 bytes with d
            append(recorder, "f", b"y" * 20),  # alone, over the bound
        ]
        await settle()
        session.release.set()
        await asyncio.gather(first, *later)
        assert [[name for name, _ in batch] for batch in session.batches] == [
            ["a"],
            ["b", "c"],
            ["d"],
            ["e"],
            ["f"],
        ]
    finally:
        await recorder.close()


async def test_a_fill_that_raises_leaves_nothing_in_the_batch() -> None:
    session = HeldSession()
    session.release.set()
    recorder = recorder_of(session)

    def broken(request: session_pb2.AppendEventsRequest) -> int:
        request.session_id = "broken"
        raise ValueError("bad event")

    try:
        with pytest.raises(ValueError, match="bad event"):
            await recorder.append_with(broken)
        await append(recorder, "a", b"1")
        assert session.batches == [[("a", [b"1"])]]
    finally:
        await recorder.close()


async def test_a_failed_call_fails_every_append_in_it() -> None:
    class Down(HeldSession):
        async def append_events_batch(
            self, request: session_pb2.AppendEventsBatchRequest
        ) -> session_pb2.AppendEventsBatchResponse:
            raise SwitchboardError("down", code=common_pb2.ERROR_CODE_SERVICE_UNAVAILABLE)

    recorder = recorder_of(Down())
    try:
        results = await asyncio.gather(
            append(recorder, "a", b"1"), append(recorder, "b", b"2"), return_exceptions=True
        )
        assert all(isinstance(result, SwitchboardError) for result in results)
    finally:
        await recorder.close()
