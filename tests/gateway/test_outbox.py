"""The outbox merges deltas for a lagging client, keeps order, and bounds memory."""

from __future__ import annotations

import json

import pytest

from switchboard.gateway.outbox import Close, Outbox, SlowConsumer


async def next_text(outbox: Outbox) -> bytes | Close | None:
    """The oldest event as JSON, as the writer takes it (a batch of one)."""
    batch = await outbox.get_batch(1)
    return batch[0][1] if isinstance(batch, list) else batch


def delta(text: str, item: str = "item_1", kind: str = "response.output_text.delta") -> dict:
    return {
        "type": kind,
        "event_id": f"e{text}",
        "item_id": item,
        "content_index": 0,
        "delta": text,
    }


async def drain(outbox: Outbox) -> list[dict]:
    events = []
    while len(outbox):
        text = await next_text(outbox)
        assert text is not None
        events.append(json.loads(text))
    return events


async def test_unsent_deltas_of_one_item_merge_in_order() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    outbox.put({"type": "response.created", "event_id": "a"})
    for word in ("The ", "quick ", "fox"):
        outbox.put(delta(word))
    outbox.put(delta("!", item="item_2"))
    outbox.put({"type": "response.output_text.done", "event_id": "b", "text": "The quick fox"})
    events = await drain(outbox)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
    ]
    assert events[1]["delta"] == "The quick fox"
    # The merged event takes the last id: its offset says how much the client has.
    assert events[1]["event_id"] == "efox"
    assert events[2]["delta"] == "!"
    assert outbox.merged == 2
    assert outbox.size == 0


async def test_a_sent_delta_is_not_merged_into() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    outbox.put(delta("a"))
    assert json.loads(await next_text(outbox) or b"")["delta"] == "a"
    outbox.put(delta("b"))
    assert json.loads(await next_text(outbox) or b"")["delta"] == "b"
    assert outbox.merged == 0


async def test_argument_deltas_merge_per_call() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    kind = "response.function_call_arguments.delta"
    outbox.put(delta('{"a"', kind=kind))
    outbox.put(delta(": 1}", kind=kind))
    outbox.put(delta("x"))  # a text delta of the same item id is not an argument delta
    events = await drain(outbox)
    assert [e["delta"] for e in events] == ['{"a": 1}', "x"]


async def test_too_far_behind_is_a_slow_consumer_and_abort_stops_the_writer() -> None:
    outbox = Outbox(max_bytes=16 * 1024)
    outbox.put({"type": "response.created", "event_id": "a"})

    def fall_behind() -> None:
        for _ in range(10_000):
            outbox.put(delta("word "))

    with pytest.raises(SlowConsumer):
        fall_behind()
    outbox.abort()
    assert await next_text(outbox) is None
    assert outbox.size == 0
    outbox.put(delta("late"))  # ignored once aborted
    assert len(outbox) == 0


async def test_close_sends_what_waits_then_the_close() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    outbox.put(delta("last words"))
    outbox.close(4529, "insufficient_quota")
    outbox.put(delta("too late"))  # dropped: the connection is ending
    first = await next_text(outbox)
    assert isinstance(first, bytes)
    assert json.loads(first)["delta"] == "last words"
    assert await next_text(outbox) == Close(4529, "insufficient_quota")


async def test_a_batch_takes_what_waits_in_order_and_a_slow_consumer_loses_nothing() -> None:
    outbox = Outbox(max_bytes=1024)
    outbox.put({"type": "response.created", "event_id": "a"})
    outbox.put(delta("one "))
    outbox.put(delta("two "))  # merged into the waiting delta
    # Past the bound: the event is still queued (and will be recorded for a
    # resume); the connection decides to cut the client.
    with pytest.raises(SlowConsumer):
        outbox.put({"type": "response.done", "event_id": "z", "padding": "x" * 2048})
    batch = await outbox.get_batch()
    assert isinstance(batch, list)
    assert [event["event_id"] for event, _ in batch] == ["a", "etwo ", "z"]
    assert json.loads(batch[1][1])["delta"] == "one two "
    assert outbox.size == 0 and len(outbox) == 0
    outbox.close(1012, "draining")
    assert outbox.ended
    assert await outbox.get_batch() == Close(1012, "draining")
