"""The Realtime protocol core, driven by feeding events: no sockets, no backends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from switchboard.errors import ServiceUnavailable
from switchboard.gateway.commands import (
    CancelResponse,
    DeleteItem,
    RetrieveItem,
    StartResponse,
    StoreItem,
    UpdateSession,
)
from switchboard.gateway.ids import Ids, event_position, event_seq
from switchboard.gateway.protocol import InvalidState, RealtimeProtocol, State
from switchboard.gateway.responses import FAST_DELTAS, UNSENT, ClientAhead, opened_output
from switchboard.v1 import common_pb2, session_pb2, toolexec_pb2


def make_protocol(max_event_bytes: int = 4096) -> RealtimeProtocol:
    config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
    protocol = RealtimeProtocol(
        session_id="sess_abc", config=config, max_event_bytes=max_event_bytes
    )
    protocol.open()
    return protocol


def send(protocol: RealtimeProtocol, event: Any) -> list[Any]:
    return protocol.receive_text(json.dumps(event))


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def only_error(protocol: RealtimeProtocol) -> dict[str, Any]:
    events = protocol.take_events()
    assert types(events) == ["error"]
    return events[0]["error"]


def test_open_sends_session_created_with_event_id() -> None:
    protocol = RealtimeProtocol(
        session_id="sess_x", config=session_pb2.SessionConfig(model="m"), max_event_bytes=1024
    )
    protocol.open()
    (event,) = protocol.take_events()
    assert event["type"] == "session.created"
    assert event["event_id"].startswith("event_")
    assert event["session"]["id"] == "sess_x"
    assert event["session"]["model"] == "m"
    assert event["session"]["type"] == "realtime"


def test_every_event_id_is_unique() -> None:
    protocol = make_protocol()
    for _ in range(50):
        send(protocol, {"type": "nope"})
    ids = [e["event_id"] for e in protocol.take_events()]
    assert len(ids) == len(set(ids)) == 51


def test_session_update_requires_type() -> None:
    protocol = make_protocol()
    protocol.take_events()
    assert send(protocol, {"type": "session.update", "session": {"instructions": "x"}}) == []
    error = only_error(protocol)
    assert error["code"] == "missing_required_parameter"
    assert error["param"] == "session.type"


def test_session_update_then_updated() -> None:
    protocol = make_protocol()
    protocol.take_events()
    (command,) = send(
        protocol,
        {
            "type": "session.update",
            "event_id": "c1",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "max_output_tokens": 50,
                "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
            },
        },
    )
    assert isinstance(command, UpdateSession)
    assert command.config.instructions == "Be brief."
    assert command.config.max_output_tokens == 50
    assert [t.name for t in command.config.tools] == ["lookup"]
    assert protocol.take_events() == []  # nothing until the store confirms
    protocol.session_updated(command)
    (event,) = protocol.take_events()
    assert event["type"] == "session.updated"
    assert event["session"]["instructions"] == "Be brief."
    assert event["session"]["max_output_tokens"] == 50


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ({"type": "realtime", "bogus": 1}, "unknown_parameter", "session.bogus"),
        ({"type": "translation"}, "invalid_value", "session.type"),
        ({"type": "transcription"}, "unsupported_feature", "session.type"),
        (
            {"type": "realtime", "max_output_tokens": -3},
            "invalid_value",
            "session.max_output_tokens",
        ),
        ({"type": "realtime", "instructions": 7}, "invalid_value", "session.instructions"),
        (
            {"type": "realtime", "tools": [{"type": "web_search"}]},
            "unsupported_feature",
            "session.tools[0].type",
        ),
        (
            {"type": "realtime", "tools": [{"type": "mcp"}]},
            "missing_required_parameter",
            "session.tools[0].server_label",
        ),
        ({"type": "realtime", "tool_choice": "sometimes"}, "invalid_value", "session.tool_choice"),
    ],
)
def test_session_update_rejects_bad_fields(session: dict[str, Any], code: str, param: str) -> None:
    protocol = make_protocol()
    protocol.take_events()
    assert send(protocol, {"type": "session.update", "event_id": "e9", "session": session}) == []
    error = only_error(protocol)
    assert (error["code"], error["param"], error["event_id"]) == (code, param, "e9")


def test_item_create_validates_and_asks_to_store() -> None:
    protocol = make_protocol()
    protocol.take_events()
    (command,) = send(
        protocol,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            },
        },
    )
    assert isinstance(command, StoreItem)
    assert command.item.id.startswith("item_")
    assert command.item.content[0].text == "hi"
    protocol.item_added(command.item, "item_prev")
    added, done = protocol.take_events()
    assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
    assert added["previous_item_id"] == "item_prev"
    assert added["item"]["content"] == [{"type": "input_text", "text": "hi"}]
    assert added["item"]["role"] == "user"


@pytest.mark.parametrize(
    ("item", "code", "param"),
    [
        (None, "missing_required_parameter", "item"),
        ({"type": "message", "role": "user"}, "missing_required_parameter", "item.content"),
        (
            {"type": "message", "content": [{"type": "input_text", "text": "x"}]},
            "missing_required_parameter",
            "item.role",
        ),
        (
            {"type": "message", "role": "user", "content": [{"type": "input_text"}]},
            "missing_required_parameter",
            "item.content[0].text",
        ),
        (
            {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]},
            "unsupported_feature",
            "item.content[0].type",
        ),
        ({"type": "message", "role": "wizard", "content": []}, "invalid_value", "item.role"),
        ({"type": "reasoning"}, "invalid_value", "item.type"),
        (
            {"type": "function_call_output", "output": "x"},
            "missing_required_parameter",
            "item.call_id",
        ),
    ],
)
def test_item_create_errors_name_the_field(item: Any, code: str, param: str) -> None:
    protocol = make_protocol()
    protocol.take_events()
    event: dict[str, Any] = {"type": "conversation.item.create"}
    if item is not None:
        event["item"] = item
    assert send(protocol, event) == []
    error = only_error(protocol)
    assert (error["code"], error["param"]) == (code, param)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_value"),
        ('{"event_id": "x"}', "missing_required_parameter"),
        ('{"type": "conversation.shout"}', "unknown_event_type"),
        ('{"type": "input_audio_buffer.append", "audio": ""}', "unsupported_feature"),
        ('{"type": "conversation.item.delete"}', "missing_required_parameter"),
    ],
)
def test_malformed_frames_get_specific_codes(frame: str, code: str) -> None:
    protocol = make_protocol()
    protocol.take_events()
    assert protocol.receive_text(frame) == []
    assert only_error(protocol)["code"] == code


def test_binary_and_oversized_frames() -> None:
    protocol = make_protocol(max_event_bytes=2048)
    protocol.take_events()
    assert protocol.receive_bytes(b"\x00\x01") == []
    assert only_error(protocol)["code"] == "binary_frame_unsupported"
    big = json.dumps({"type": "conversation.item.create", "pad": "é" * 1500})  # > 2048 bytes
    assert protocol.receive_text(big) == []
    assert only_error(protocol)["code"] == "frame_too_large"
    # The connection stays usable afterwards.
    assert send(protocol, {"type": "response.create"})


def run_response(
    protocol: RealtimeProtocol, deltas: list[str]
) -> tuple[StartResponse, list[dict[str, Any]]]:
    (command,) = send(protocol, {"type": "response.create"})
    assert isinstance(command, StartResponse)
    for delta in deltas:
        protocol.text_delta(command.response_id, delta)
    return command, protocol.take_events()


def test_response_full_ga_sequence() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, events = run_response(protocol, ["Hel", "lo"])
    stored = protocol.complete_output(command.response_id, complete=True)
    usage = common_pb2.Usage(input_tokens=10, output_tokens=2, total_tokens=12)
    protocol.response_done(command.response_id, status="completed", usage=usage)
    events += protocol.take_events()
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert events[6]["text"] == "Hello"
    assert [i.content[0].text for i in stored] == ["Hello"]
    assert stored[0].role == common_pb2.ROLE_ASSISTANT
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["usage"]["input_tokens"] == 10
    assert done["usage"]["output_tokens"] == 2
    assert done["usage"]["total_tokens"] == 12
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "Hello"}]
    assert all(isinstance(v, int) for v in done["usage"]["output_token_details"].values())
    assert len({e["event_id"] for e in events}) == len(events)


def test_second_response_while_one_runs_is_refused() -> None:
    protocol = make_protocol()
    protocol.take_events()
    run_response(protocol, [])
    assert send(protocol, {"type": "response.create"}) == []
    assert only_error(protocol)["code"] == "conversation_already_has_active_response"


def test_cancel_without_response_is_an_error() -> None:
    protocol = make_protocol()
    protocol.take_events()
    assert send(protocol, {"type": "response.cancel"}) == []
    assert only_error(protocol)["code"] == "response_cancel_not_active"


def test_cancel_ends_response_cancelled_with_usage() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, _ = run_response(protocol, ["par"])
    (cancel,) = send(protocol, {"type": "response.cancel"})
    assert isinstance(cancel, CancelResponse)
    assert cancel.response_id == command.response_id
    # A second cancel while the first is in flight is refused.
    assert send(protocol, {"type": "response.cancel"}) == []
    assert only_error(protocol)["code"] == "response_cancel_not_active"
    (item,) = protocol.complete_output(command.response_id, complete=False)
    assert item.status == common_pb2.ITEM_STATUS_INCOMPLETE
    protocol.response_done(
        command.response_id,
        status="cancelled",
        usage=common_pb2.Usage(input_tokens=3, output_tokens=1),
        reason="client_cancelled",
    )
    done = protocol.take_events()[-1]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["response"]["usage"]["total_tokens"] == 4
    # The conversation is free for the next response.
    assert send(protocol, {"type": "response.create"})


def test_failed_response_reports_error_event_and_details() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, _ = run_response(protocol, [])
    assert protocol.complete_output(command.response_id, complete=False) == []
    protocol.response_done(
        command.response_id,
        status="failed",
        usage=common_pb2.Usage(),
        error=ServiceUnavailable("The broker service is unavailable."),
    )
    error, done = protocol.take_events()
    assert error["type"] == "error"
    assert error["error"]["code"] == "service_unavailable"
    assert done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "service_unavailable"
    assert done["response"]["usage"]["total_tokens"] == 0


def test_response_overrides() -> None:
    protocol = make_protocol()
    protocol.take_events()
    (command,) = send(
        protocol,
        {"type": "response.create", "response": {"instructions": "Shout.", "max_output_tokens": 5}},
    )
    assert isinstance(command, StartResponse)
    assert command.instructions == "Shout."
    assert command.max_output_tokens == 5
    created = protocol.take_events()[0]
    assert created["response"]["max_output_tokens"] == 5
    assert created["response"]["status"] == "in_progress"


def test_delete_and_retrieve_commands() -> None:
    protocol = make_protocol()
    protocol.take_events()
    (delete,) = send(protocol, {"type": "conversation.item.delete", "item_id": "item_1"})
    assert delete == DeleteItem(item_id="item_1", client_event_id=None)
    protocol.item_deleted("item_1")
    (retrieve,) = send(
        protocol, {"type": "conversation.item.retrieve", "item_id": "item_1", "event_id": "q"}
    )
    assert retrieve == RetrieveItem(item_id="item_1", client_event_id="q")
    item = common_pb2.Item(
        id="item_1",
        type=common_pb2.ITEM_TYPE_MESSAGE,
        role=common_pb2.ROLE_USER,
        content=[common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text="x")],
    )
    protocol.item_retrieved(item)
    deleted, retrieved = protocol.take_events()
    assert deleted == {
        "type": "conversation.item.deleted",
        "event_id": deleted["event_id"],
        "item_id": "item_1",
    }
    assert retrieved["item"]["id"] == "item_1"


def test_function_calls_stream_as_output_items() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, events = run_response(protocol, ["Let me check. "])
    rid = command.response_id
    protocol.call_delta(rid, 0, "call_a", "lookup", "")
    protocol.call_delta(rid, 1, "call_b", "clock", '{"tz"')
    protocol.call_delta(rid, 0, "", "", '{"q": 1}')
    protocol.call_delta(rid, 1, "", "", ': "UTC"}')
    stored = protocol.complete_output(rid, complete=True)
    protocol.response_done(rid, status="completed", usage=common_pb2.Usage(input_tokens=1))
    events += protocol.take_events()
    assert types(events) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_item.added",
        "conversation.item.added",
        "response.output_item.added",
        "conversation.item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "conversation.item.done",
        "conversation.item.done",
        "conversation.item.done",
        "response.done",
    ]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "message"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    assert added[1]["item"]["call_id"] == "call_a"
    args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["call_id"], e["name"], e["arguments"]) for e in args_done] == [
        ("call_a", "lookup", '{"q": 1}'),
        ("call_b", "clock", '{"tz": "UTC"}'),
    ]
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [e["output_index"] for e in deltas] == [2, 1, 2]
    assert [i.type for i in stored] == [
        common_pb2.ITEM_TYPE_MESSAGE,
        common_pb2.ITEM_TYPE_FUNCTION_CALL,
        common_pb2.ITEM_TYPE_FUNCTION_CALL,
    ]
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert output[1]["status"] == "completed"


def test_follow_up_response_during_a_tool_round() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, _ = run_response(protocol, [])
    protocol.call_delta(command.response_id, 0, "call_a", "calculate", "{}")
    protocol.complete_output(command.response_id, complete=True)
    protocol.response_done(command.response_id, status="completed", usage=common_pb2.Usage())
    protocol.take_events()
    protocol.tools_started()
    # The client cannot start its own response while the server runs tools.
    assert send(protocol, {"type": "response.create"}) == []
    assert only_error(protocol)["code"] == "conversation_already_has_active_response"
    follow = protocol.follow_up(command)
    assert follow.response_id != command.response_id
    assert follow.max_output_tokens == command.max_output_tokens
    (created,) = protocol.take_events()
    assert created["type"] == "response.created"
    assert created["response"]["id"] == follow.response_id


def test_cancelled_call_is_incomplete() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, _ = run_response(protocol, [])
    protocol.call_delta(command.response_id, 0, "call_a", "calculate", '{"expr')
    (item,) = protocol.complete_output(command.response_id, complete=False)
    assert item.status == common_pb2.ITEM_STATUS_INCOMPLETE
    assert item.arguments == '{"expr'


def test_event_ids_carry_their_seq_and_a_resumed_connection_counts_on() -> None:
    ids = Ids(lambda n: "ab" * n, first_event_seq=41)
    first, second = ids.new("event"), ids.new("event")
    assert (event_seq(first), event_seq(second)) == (41, 42)
    assert ids.new("item").startswith("item_")
    assert event_seq(ids.new("event")) == 43  # other kinds do not use up seqs
    for foreign in ("event_abc", "evt_0123456789ab1", "event_0123456789abZ", ""):
        assert event_seq(foreign) is None


def test_a_response_left_unfinished_by_a_killed_gateway_ends_failed() -> None:
    protocol = RealtimeProtocol(
        session_id="sess_1",
        config=session_pb2.SessionConfig(model="gpt-realtime"),
        max_event_bytes=1 << 16,
        first_event_seq=7,
    )
    protocol.open(resumed=True)
    protocol.interrupted("resp_old")
    events = protocol.take_events()
    assert [e["type"] for e in events] == ["error", "response.done"]
    assert [event_seq(e["event_id"]) for e in events] == [7, 8]
    done = events[-1]["response"]
    assert (done["id"], done["status"]) == ("resp_old", "failed")
    assert done["status_details"]["error"]["code"] == "response_interrupted"
    assert done["usage"]["total_tokens"] == 0
    assert protocol.response is None  # a new response may start


# A response as a broker streams it: text, then two calls, interleaved.
_STREAM: list[tuple[Any, ...]] = [
    ("text", "Let me "),
    ("text", "check. "),
    ("call", 0, "call_a", "lookup", ""),
    ("call", 1, "call_b", "clock", '{"tz"'),
    ("call", 0, "", "", '{"q": '),
    ("text", "One moment."),
    ("call", 1, "", "", ': "UTC"}'),
    ("call", 0, "", "", "1}"),
]
# The same, as an Attach snapshot merges it: one delta per output, in the order
# the outputs first appeared.
_MERGED: list[tuple[Any, ...]] = [
    ("text", "Let me check. One moment."),
    ("call", 0, "call_a", "lookup", '{"q": 1}'),
    ("call", 1, "call_b", "clock", '{"tz": "UTC"}'),
]


def feed(protocol: RealtimeProtocol, response_id: str, stream: list[tuple[Any, ...]]) -> None:
    for step in stream:
        if step[0] == "text":
            protocol.text_delta(response_id, step[1])
        else:
            protocol.call_delta(response_id, *step[1:])


def finish(protocol: RealtimeProtocol, response_id: str) -> list[dict[str, Any]]:
    protocol.complete_output(response_id, complete=True)
    protocol.response_done(response_id, status="completed", usage=common_pb2.Usage())
    return protocol.take_events()


def outputs(events: list[dict[str, Any]]) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """What a client makes of a response's events: per output index, the item's id,
    type and what its deltas add up to; and the final output, without item ids."""
    built: dict[int, list[Any]] = {}
    for event in events:
        if event["type"] == "response.output_item.added":
            built[event["output_index"]] = [event["item"]["id"], event["item"]["type"], ""]
        elif event["type"].endswith(".delta"):
            built[event["output_index"]][2] += event["delta"]
    final = [
        {k: v for k, v in item.items() if k != "id"} for item in events[-1]["response"]["output"]
    ]
    return [built[i] for i in sorted(built)], final


@pytest.mark.parametrize("stream", [_STREAM, _MERGED], ids=["chunked", "merged"])
def test_a_response_taken_over_from_its_log_goes_on_where_the_log_ends(
    stream: list[tuple[Any, ...]],
) -> None:
    """Cut the events of a response at every point (what a killed gateway logged),
    take it over from there in another connection and feed it the whole model
    stream again: the client sees each output once, whole, under one item id."""
    whole = make_protocol()
    whole.take_events()
    (command,) = send(whole, {"type": "response.create"})
    feed(whole, command.response_id, _STREAM)
    streamed = whole.take_events()
    expected_items, expected_output = outputs(streamed + finish(whole, command.response_id))
    assert [kind for _, kind, _ in expected_items] == ["message", *["function_call"] * 2]
    for cut in range(1, len(streamed) + 1):
        logged = streamed[:cut]
        taker = RealtimeProtocol(
            session_id="sess_abc",
            config=session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto"),
            max_event_bytes=4096,
            first_event_seq=cut + 1,
        )
        taker.open(resumed=True)
        resumed = taker.reopen(logged)
        assert resumed.response_id == command.response_id
        feed(taker, resumed.response_id, stream)
        items, output = outputs(logged + taker.take_events() + finish(taker, resumed.response_id))
        assert output == expected_output, cut
        assert [row[1:] for row in items] == [row[1:] for row in expected_items], cut
        # Items the log had keep their ids; items opened after the cut get new ones.
        opened = {e["item"]["id"] for e in logged if e["type"] == "response.output_item.added"}
        for (item_id, _, _), (expected_id, _, _) in zip(items, expected_items, strict=True):
            assert (item_id == expected_id) == (expected_id in opened), cut


@pytest.mark.parametrize("stream", [_STREAM, _MERGED], ids=["chunked", "merged"])
def test_a_client_ahead_of_the_log_gets_the_rest_once_and_the_log_its_gap(
    stream: list[tuple[Any, ...]],
) -> None:
    """Cut the log at every point, and let the client have had any number of the
    deltas a sender sends before recording them (of the output opened last):
    taken over from the log and the client's last delta id, the client gets the
    rest of each output once, and the log gets what it lacked, under that id."""
    whole = make_protocol()
    whole.take_events()
    (command,) = send(whole, {"type": "response.create"})
    feed(whole, command.response_id, _STREAM)
    streamed = whole.take_events()
    expected_items, expected_output = outputs(streamed + finish(whole, command.response_id))
    cases = 0
    for cut in range(1, len(streamed) + 1):
        opened = None
        for event in streamed[:cut]:
            opened = opened_output(event) or opened
        sent = cut
        while (
            sent < len(streamed)
            and streamed[sent]["type"] in FAST_DELTAS
            and streamed[sent]["item_id"] == opened
        ):
            sent += 1
            received = streamed[:sent]
            last = received[-1]["event_id"]
            position = event_position(last)
            assert position is not None and position.offset is not None
            taker = RealtimeProtocol(
                session_id="sess_abc",
                config=session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto"),
                max_event_bytes=4096,
                first_event_seq=position.seq + 1,
            )
            taker.open(resumed=True)
            resumed = taker.reopen(streamed[:cut], ClientAhead(last, position.offset))
            feed(taker, resumed.response_id, stream)
            after = taker.take_events() + finish(taker, resumed.response_id)
            context = (cut, sent)
            assert [e["event_id"] for e in after if UNSENT in e] == [last], context
            sent_after = [e for e in after if UNSENT not in e]
            for seen in (received + sent_after, streamed[:cut] + after):
                items, output = outputs(seen)
                assert output == expected_output, context
                assert [row[1:] for row in items] == [row[1:] for row in expected_items], context
            seqs = [event_seq(e["event_id"]) or 0 for e in sent_after]
            assert min(seqs) > position.seq, context
            cases += 1
    assert cases > 3


def test_a_delta_id_says_how_much_of_its_output_the_client_has() -> None:
    protocol = make_protocol()
    protocol.take_events()
    _, events = run_response(protocol, ["Hé", "llo"])
    offsets = [
        event_position(e["event_id"]) for e in events if e["type"] == "response.output_text.delta"
    ]
    assert [p.offset for p in offsets if p is not None] == [2, 5]
    others = [event_position(e["event_id"]) for e in events if e["type"] not in FAST_DELTAS]
    assert all(p is not None and p.offset is None for p in others)


def test_a_log_that_is_not_a_streaming_response_is_not_taken_over() -> None:
    protocol = make_protocol()
    protocol.take_events()
    command, events = run_response(protocol, ["Hi"])
    ended = events + finish(protocol, command.response_id)
    for logged in ([], events[1:], ended, [*events, {"type": "response.output_text.delta"}]):
        with pytest.raises(ValueError, match="response"):
            make_protocol().reopen(logged)


def test_a_report_in_the_wrong_state_is_a_driver_bug() -> None:
    protocol = RealtimeProtocol(
        session_id="sess_s", config=session_pb2.SessionConfig(model="m"), max_event_bytes=1024
    )
    assert protocol.state is State.NEW
    with pytest.raises(InvalidState):
        protocol.receive_text("{}")
    protocol.open()
    with pytest.raises(InvalidState):
        protocol.open()
    with pytest.raises(InvalidState):
        protocol.text_delta("resp_x", "a")
    with pytest.raises(InvalidState):
        protocol.tool_output(common_pb2.Item(), toolexec_pb2.ExecuteResponse())
    (command,) = send(protocol, {"type": "response.create"})
    assert protocol.state is State.RESPONDING
    with pytest.raises(InvalidState):
        protocol.text_delta("resp_other", "a")
    with pytest.raises(InvalidState):
        protocol.follow_up(command)
    with pytest.raises(InvalidState):
        protocol.tools_started()
    protocol.complete_output(command.response_id, complete=True)
    protocol.response_done(command.response_id, status="completed", usage=common_pb2.Usage())
    assert protocol.state is State.IDLE
    protocol.tools_started()
    assert protocol.state is State.TOOLS
    protocol.tools_ended()
    assert protocol.state is State.IDLE
