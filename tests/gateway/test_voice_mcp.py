"""VoiceMcp's translation of an upstream's function calls into `mcp_call` items, fed
events as a voice session sees them (no sockets); approval requests and answers;
the ids of the gateway's own events. (Listing and calling need toolexec and an MCP server:
tests/e2e/test_voice_mcp.py.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from switchboard.errors import InvalidRequest
from switchboard.gateway import items
from switchboard.gateway.mcp_output import McpName
from switchboard.gateway.mcp_session import NOT_APPROVED
from switchboard.gateway.voice_mcp import VoiceMcp
from switchboard.gateway.voice_mcp_offer import McpOffer
from switchboard.gateway.voice_outbox import local_event
from switchboard.gateway.voice_resume import ResumeState
from switchboard.tenancy import McpServer

SERVERS = {"shop": McpServer("shop", "https://mcp.shop.example/mcp")}
CALL = {
    "id": "item_9",
    "object": "realtime.item",
    "type": "function_call",
    "status": "in_progress",
    "name": "shop__lookup",
    "call_id": "call_1",
    "arguments": "",
}


def mcp() -> tuple[VoiceMcp, list[str]]:
    to_client: list[str] = []
    offer = McpOffer(
        None,  # type: ignore[arg-type]  # never called here
        "acme",
        "sess_1",
        SERVERS,
        new_id=lambda: "item_1",
        to_client=to_client.append,
    )
    voice = VoiceMcp(offer)
    voice.names["shop__lookup"] = McpName("shop", "lookup", needs_approval=False)
    return voice, to_client


def call_events() -> list[dict[str, Any]]:
    """A function call as the upstream streams it (ids as the broker numbers them)."""
    where = {"response_id": "resp_1", "item_id": "item_9", "output_index": 0, "call_id": "call_1"}
    whole = {**CALL, "status": "completed", "arguments": '{"q":"ord_7"}'}
    return [
        {
            "type": "response.output_item.added",
            "event_id": "event_v5",
            "response_id": "resp_1",
            "output_index": 0,
            "item": CALL,
        },
        {"type": "conversation.item.added", "event_id": "event_v6", "item": CALL},
        {
            "type": "response.function_call_arguments.delta",
            "event_id": "event_v7",
            **where,
            "delta": '{"q":',
        },
        {
            "type": "response.function_call_arguments.delta",
            "event_id": "event_v8",
            **where,
            "delta": '"ord_7"}',
        },
        {
            "type": "response.function_call_arguments.done",
            "event_id": "event_v9",
            **where,
            "name": "shop__lookup",
            "arguments": '{"q":"ord_7"}',
        },
        {
            "type": "response.output_item.done",
            "event_id": "event_va",
            "response_id": "resp_1",
            "output_index": 0,
            "item": whole,
        },
        {"type": "conversation.item.done", "event_id": "event_vb", "item": whole},
    ]


def test_an_mcp_call_streams_as_an_mcp_call_item_and_its_ends_are_held() -> None:
    voice, _ = mcp()
    shown = [voice.translate(event) for event in call_events()]
    added, conversation_added, delta1, delta2, *held = shown
    assert held == ["", "", ""]  # arguments.done, output_item.done, conversation.item.done
    for text in (added, conversation_added):
        item = orjson.loads(text or "")["item"]
        assert item == {
            "id": "item_9",
            "object": "realtime.item",
            "type": "mcp_call",
            "server_label": "shop",
            "name": "lookup",
            "arguments": "",
            "approval_request_id": None,
            "output": None,
            "error": None,
        }
    assert orjson.loads(delta1 or "") == {
        "type": "response.mcp_call_arguments.delta",
        "event_id": "event_v7",
        "response_id": "resp_1",
        "item_id": "item_9",
        "output_index": 0,
        "delta": '{"q":',
    }
    assert orjson.loads(delta2 or "")["delta"] == '"ord_7"}'
    # Other events, and calls of the client's own functions, go as they are.
    assert voice.translate({"type": "response.output_audio.delta", "delta": "AAAA"}) is None
    other = {**CALL, "id": "item_2", "name": "get_weather"}
    assert voice.translate({"type": "response.output_item.added", "item": other}) is None


def test_a_call_that_ran_closes_with_its_output_and_the_response_done_shows_it() -> None:
    voice, to_client = mcp()
    for event in call_events():
        voice.translate(event)
    done = {
        "type": "response.done",
        "event_id": "event_vc",
        "response": {"id": "resp_1", "status": "completed", "output": [call_events()[-1]["item"]]},
    }
    entries = voice.calls_of(done["response"])
    assert [entry.call_id for entry in entries] == ["call_1"]
    voice.started(entries)
    (entry,) = entries
    entry.output = '{"status":"shipped"}'
    text = voice.response_done(done, entries)
    events = [orjson.loads(t) for t in to_client]
    assert [(e["type"], e["event_id"]) for e in events] == [
        ("response.mcp_call_arguments.done", "event_v9"),
        ("response.mcp_call.in_progress", events[1]["event_id"]),
        ("response.output_item.done", "event_va"),
        ("conversation.item.done", "event_vb"),
    ]
    # The gateway's own event follows the upstream event before it (for a resume).
    assert events[1]["event_id"].startswith("event_v9_sbv")
    assert events[0]["arguments"] == '{"q":"ord_7"}'
    final = events[2]["item"]
    assert (final["type"], final["arguments"], final["output"]) == (
        "mcp_call",
        '{"q":"ord_7"}',
        '{"status":"shipped"}',
    )
    assert orjson.loads(text)["response"]["output"] == [final]
    # The gateway's answer upstream is not shown to the client.
    voice._answered.add("call_1")
    output = {"type": "function_call_output", "call_id": "call_1", "output": "{}"}
    assert voice.translate({"type": "conversation.item.added", "item": output}) == ""


def test_a_call_of_a_cancelled_response_is_closed_without_running() -> None:
    voice, to_client = mcp()
    for event in call_events()[:3]:
        voice.translate(event)
    done = {
        "type": "response.done",
        "event_id": "event_vc",
        "response": {"id": "resp_1", "status": "cancelled", "output": [CALL]},
    }
    text = voice.response_done(done, voice.calls_of(done["response"]))
    (arguments_done,) = [orjson.loads(t) for t in to_client]
    assert arguments_done["type"] == "response.mcp_call_arguments.done"
    assert arguments_done["arguments"] == '{"q":'
    (item,) = orjson.loads(text)["response"]["output"]
    assert (item["type"], item["output"], item["error"]) == ("mcp_call", None, None)


def test_a_call_that_needs_approval_is_an_approval_request_answered_in_the_next_response() -> None:
    voice, to_client = mcp()
    voice.names["shop__lookup"] = McpName("shop", "lookup", needs_approval=True)
    shown = [voice.translate(event) for event in call_events()]
    added, _, delta1, delta2, arguments_done, item_done, conversation_done = shown
    assert orjson.loads(added or "")["item"]["type"] == "mcp_approval_request"
    assert (delta1, delta2, arguments_done) == ("", "", "")  # its arguments come whole
    for text in (item_done, conversation_done):
        item = orjson.loads(text or "")["item"]
        assert (item["type"], item["arguments"]) == ("mcp_approval_request", '{"q":"ord_7"}')
    done = {
        "type": "response.done",
        "response": {"id": "resp_1", "status": "completed", "output": [CALL]},
    }
    assert not voice.offer.runs("shop__lookup")
    text = voice.response_done(done, voice.calls_of(done["response"]))
    assert orjson.loads(text)["response"]["output"][0]["type"] == "mcp_approval_request"
    assert not to_client
    # The client's answer: shown as added; one naming no request is item_not_found.
    answer = items.item_from_client(
        {"type": "mcp_approval_response", "approval_request_id": "item_9", "approve": False}
    )
    voice.approval_answer(answer)
    assert [orjson.loads(t)["type"] for t in to_client] == [
        "conversation.item.added",
        "conversation.item.done",
    ]
    with pytest.raises(InvalidRequest) as refused:
        voice.approval_answer(answer)  # acted on once
    assert refused.value.name == "item_not_found"


async def test_a_denied_call_opens_the_next_response_failed_before_its_output() -> None:
    voice, to_client = mcp()
    voice.names["shop__lookup"] = McpName("shop", "lookup", needs_approval=True)
    for event in call_events():
        voice.translate(event)
    done = {"type": "response.done", "response": {"id": "resp_1", "output": [CALL]}}
    voice.response_done(done, voice.calls_of(done["response"]))
    voice.approval_answer(
        items.item_from_client(
            {
                "type": "mcp_approval_response",
                "approval_request_id": "item_9",
                "approve": False,
                "reason": "no",
            }
        )
    )
    to_client.clear()
    ((call_id, given),) = await voice.answer_approvals()  # nothing runs: no toolexec
    assert call_id == "call_1" and NOT_APPROVED in given
    voice.opened({"type": "response.created", "response": {"id": "resp_2"}})
    assert [orjson.loads(t)["type"] for t in to_client] == [
        "response.output_item.added",
        "conversation.item.added",
        "response.mcp_call.failed",
    ]
    # The upstream's own output of that response comes after the call.
    delta = {"type": "response.output_text.delta", "response_id": "resp_2", "output_index": 0}
    assert orjson.loads(voice.translate(delta) or "")["output_index"] == 1
    message = {"id": "item_m", "type": "message"}
    done = {"type": "response.done", "response": {"id": "resp_2", "output": [message]}}
    assert voice.closes(done["response"])
    output = orjson.loads(voice.response_done(done, []))["response"]["output"]
    assert [item["type"] for item in output] == ["mcp_call", "message"]
    assert output[0]["error"]["message"] == NOT_APPROVED + " Reason given: no"
    assert output[0]["approval_request_id"] == "item_9"


def test_the_gateways_own_events_are_numbered_after_the_last_upstream_event() -> None:
    resume = ResumeState()
    resume.seen({"event_id": "event_v1f"})
    text = resume.local_ids(local_event("mcp_list_tools.in_progress", item_id="item_1"))
    assert orjson.loads(text)["event_id"].startswith("event_v1f_sbv")
    # An upstream event, whatever it holds, keeps its id.
    upstream = orjson.dumps(
        {"type": "conversation.item.added", "event_id": "event_v20", "x": '"event_id":"event_sbv'}
    ).decode()
    assert resume.local_ids(upstream) == upstream
