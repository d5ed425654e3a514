"""The record of what a voice session's rollover carries, fed recorded events (no sockets)."""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.broker.realtime_carry import UNTRANSCRIBED, Carried, watched


def item(item_id: str, role: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": role, "content": list(parts)}


def added(entry: dict[str, Any], previous: str | None) -> dict[str, Any]:
    return {"type": "conversation.item.added", "previous_item_id": previous, "item": entry}


def test_the_session_is_kept_without_the_fields_no_client_sets() -> None:
    carried = Carried()
    session = {"id": "sess_1", "object": "realtime.session", "model": "m", "expires_at": 9}
    carried.observe({"type": "session.created", "session": {**session, "instructions": "a"}})
    carried.observe({"type": "session.updated", "session": {**session, "instructions": "b"}})
    assert orjson.loads(carried.session_update()) == {
        "type": "session.update",
        "session": {"type": "realtime", "instructions": "b"},
    }


def test_between_turns_means_no_response_no_speech_and_no_uncommitted_manual_turn() -> None:
    carried = Carried()
    assert carried.idle
    carried.observe({"type": "response.created", "response": {"id": "r1"}})
    assert not carried.idle
    carried.observe({"type": "response.done", "response": {"id": "r1"}})
    assert carried.idle
    carried.observe({"type": "input_audio_buffer.speech_started"})
    assert not carried.idle
    carried.observe({"type": "input_audio_buffer.committed"})
    assert carried.idle
    # With server VAD, appended audio that is not speech does not hold a rollover...
    carried.client_event("input_audio_buffer.append")
    assert carried.idle
    # ...without turn detection, the client's uncommitted turn does.
    off = {"audio": {"input": {"turn_detection": None}}}
    carried.observe({"type": "session.updated", "session": off})
    carried.client_event("input_audio_buffer.append")
    assert not carried.idle
    carried.client_event("input_audio_buffer.commit")
    assert carried.idle


def test_items_are_replayed_in_order_with_their_ids_audio_as_text() -> None:
    carried = Carried()
    spoken = item("i1", "user", {"type": "input_audio", "transcript": None, "audio": "AAAA"})
    carried.observe(added(spoken, None))
    carried.observe(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "i1",
            "content_index": 0,
            "transcript": "hello",
        }
    )
    carried.observe(
        added(item("i3", "assistant", {"type": "output_audio", "transcript": "hi"}), "i1")
    )
    # Placed after i1, before i3, as previous_item_id says.
    carried.observe(added(item("i2", "user", {"type": "input_audio", "transcript": None}), "i1"))
    call = {"id": "i4", "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    carried.observe(added({**call, "status": "completed", "object": "realtime.item"}, "i3"))
    carried.observe(added({"id": "i5", "type": "mcp_call"}, "i4"))
    carried.observe(added(item("i6", "user", {"type": "input_text", "text": "x"}), "i5"))
    carried.observe({"type": "conversation.item.deleted", "item_id": "i6"})
    events, as_text = carried.replay("ev_")
    created = [orjson.loads(event)["item"] for event in events]
    assert [entry["id"] for entry in created] == ["i1", "i2", "i3", "i4"]
    assert created[0]["content"] == [{"type": "input_text", "text": "hello"}]
    assert created[1]["content"] == [{"type": "input_text", "text": UNTRANSCRIBED}]
    assert created[2]["content"] == [{"type": "output_text", "text": "hi"}]
    assert created[3] == call
    assert as_text == {"i3"}
    # A truncate empties the carried transcript.
    carried.observe({"type": "conversation.item.truncated", "item_id": "i3", "content_index": 0})
    events, _ = carried.replay("ev_")
    assert orjson.loads(events[2])["item"]["content"] == [{"type": "output_text", "text": ""}]
    assert carried.predecessor("i3") == "i2" and carried.predecessor("i1") is None


def test_only_events_that_change_the_record_are_parsed() -> None:
    assert watched(b'{"type":"conversation.item.added","item":{}}')
    assert watched(b'{"type":"response.done","response":{}}')
    assert not watched(b'{"type":"response.output_audio.delta","delta":"AAAA"}')
    assert not watched(b'{"type":"response.output_audio_transcript.delta","delta":"hi"}')
