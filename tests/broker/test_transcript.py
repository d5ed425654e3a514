"""The transcript of a held call (pure): recorded events in, a merged snapshot out."""

from __future__ import annotations

from switchboard.broker.transcript import Transcript
from switchboard.v1 import broker_pb2 as B


def text(value: str) -> B.GenerateEvent:
    return B.GenerateEvent(text_delta=B.TextDelta(text=value))


def tool(index: int, arguments: str, call_id: str = "", name: str = "") -> B.GenerateEvent:
    delta = B.ToolCallDelta(index=index, call_id=call_id, name=name, arguments=arguments)
    return B.GenerateEvent(tool_call_delta=delta)


STARTED = B.GenerateEvent(started=B.Started(upstream="default (sim)", upstream_model="m"))


def test_the_snapshot_merges_each_output_in_order_of_first_appearance() -> None:
    transcript = Transcript(max_bytes=1 << 20)
    events = [
        STARTED,
        tool(1, '{"tz', call_id="call_b", name="get_time"),
        text("Let me "),
        tool(0, '{"ci', call_id="call_a", name="get_weather"),
        tool(1, '":"CET"}'),
        text("check."),
        tool(0, 'ty":"Paris"}'),
    ]
    assert all(transcript.add(event) for event in events)
    assert transcript.snapshot() == [
        STARTED,
        tool(1, '{"tz":"CET"}', call_id="call_b", name="get_time"),
        text("Let me check."),
        tool(0, '{"city":"Paris"}', call_id="call_a", name="get_weather"),
    ]


def test_an_empty_transcript_has_an_empty_snapshot_and_finished_is_not_kept() -> None:
    transcript = Transcript(max_bytes=10)
    assert transcript.snapshot() == []
    assert transcript.add(B.GenerateEvent(finished=B.Finished(reason=B.FINISH_REASON_STOP)))
    assert transcript.snapshot() == []


def test_the_size_counts_utf8_bytes_and_add_refuses_past_the_cap() -> None:
    transcript = Transcript(max_bytes=12)
    assert transcript.add(STARTED)
    assert transcript.add(text("héllo"))  # 6 bytes
    assert transcript.size == 6
    assert transcript.add(tool(0, "{}", call_id="c1", name="f"))  # 5 more
    assert transcript.size == 11
    assert transcript.add(text("!"))  # 12: at the cap
    assert not transcript.add(text("?"))  # 13: past it
