"""The broker's pure core, fed recorded requests and upstream chunks; no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.broker.events import as_event
from switchboard.broker.translate import ChunkTranslator, chat_request
from switchboard.errors import InvalidRequest
from switchboard.v1 import broker_pb2, common_pb2, session_pb2

B = broker_pb2
C = common_pb2

# ----------------------------------------------------------------- request side


def message(role: int, *texts: str) -> C.Item:
    kind = C.CONTENT_TYPE_INPUT_TEXT if role == C.ROLE_USER else C.CONTENT_TYPE_OUTPUT_TEXT
    return C.Item(
        type=C.ITEM_TYPE_MESSAGE,
        role=role,
        content=[C.ContentPart(type=kind, text=text) for text in texts],
    )


def call(call_id: str, name: str, arguments: str) -> C.Item:
    return C.Item(type=C.ITEM_TYPE_FUNCTION_CALL, call_id=call_id, name=name, arguments=arguments)


def output(call_id: str, text: str) -> C.Item:
    return C.Item(type=C.ITEM_TYPE_FUNCTION_CALL_OUTPUT, call_id=call_id, output=text)


WEATHER = C.ToolDefinition(
    name="get_weather",
    description="Current weather of a city.",
    parameters_json='{"type":"object","properties":{"city":{"type":"string"}}}',
)
CLOCK = C.ToolDefinition(name="get_time")


def request(*items: C.Item, **fields: Any) -> B.GenerateRequest:
    instructions = fields.pop("instructions", "")
    fields.setdefault("model", "gpt-4o-mini")
    context = session_pb2.Context(instructions=instructions, items=list(items))
    return B.GenerateRequest(tenant_id="t1", response_id="resp_1", context=context, **fields)


def test_conversation_becomes_chat_messages() -> None:
    req = request(
        message(C.ROLE_USER, "Weather in ", "Paris and the time?"),
        message(C.ROLE_ASSISTANT, "Let me check."),
        call("call_a", "get_weather", '{"city":"Paris"}'),
        call("call_b", "get_time", ""),
        output("call_a", '{"temp_c":21}'),
        output("call_b", "12:00"),
        message(C.ROLE_SYSTEM, "Answer in one line."),
        message(C.ROLE_USER, "Thanks"),
        instructions="Be brief.",
    )
    body = chat_request(req, None)
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Let me check."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c":21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Thanks"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    for absent in ("tools", "tool_choice", "max_completion_tokens", "temperature"):
        assert absent not in body


def test_trailing_function_calls_are_flushed_and_separated_by_outputs() -> None:
    req = request(
        call("c1", "a", "{}"),
        output("c1", "x"),
        call("c2", "b", "{}"),
    )
    messages = chat_request(req, None)["messages"]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert [len(m.get("tool_calls", ())) for m in messages] == [1, 0, 1]


def test_mcp_calls_that_ran_become_a_call_and_its_result() -> None:
    def mcp(call_id: str, **fields: Any) -> C.Item:
        return C.Item(
            type=C.ITEM_TYPE_MCP_CALL,
            call_id=call_id,
            server_label="shop",
            name="lookup",
            arguments='{"id":1}',
            **fields,
        )

    req = request(
        C.Item(type=C.ITEM_TYPE_MCP_LIST_TOOLS, server_label="shop", tools_json="[]"),
        mcp("c1", output='{"ok":true}'),
        mcp("c2", error_json='{"type":"tool_execution_error","message":"no"}'),
        C.Item(type=C.ITEM_TYPE_MCP_APPROVAL_REQUEST, call_id="c3", server_label="shop"),
        mcp("c4"),  # never ran: the response broke off
        C.Item(type=C.ITEM_TYPE_MCP_APPROVAL_RESPONSE, approval_request_id="x", approve=True),
    )
    messages = chat_request(req, None)["messages"]
    assert messages == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "shop__lookup", "arguments": '{"id":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok":true}'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "shop__lookup", "arguments": '{"id":1}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "c2",
            "content": '{"error": {"type": "tool_execution_error", "message": "no"}}',
        },
    ]


def test_tools_and_options() -> None:
    req = request(
        message(C.ROLE_USER, "hi"),
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_output_tokens=256,
        temperature=0.7,
    )
    body = chat_request(req, "gpt-4.1-mini")
    assert body["model"] == "gpt-4.1-mini"
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ]
    assert body["tool_choice"] == "required"
    assert body["max_completion_tokens"] == 256
    # The proto float32 0.7 is sent as 0.7, not 0.699999988079071.
    assert body["temperature"] == 0.7


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice(choice: str, expected: object) -> None:
    body = chat_request(request(tools=[WEATHER], tool_choice=choice), None)
    assert body["tool_choice"] == expected


def test_tool_choice_is_omitted_without_tools_or_when_empty() -> None:
    assert "tool_choice" not in chat_request(request(tool_choice="auto"), None)
    assert "tool_choice" not in chat_request(request(tools=[WEATHER]), None)


def test_temperature_zero_is_sent() -> None:
    assert chat_request(request(temperature=0.0), None)["temperature"] == 0.0


def test_missing_model_and_bad_tool_schema_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(request(model=""), None)
    assert caught.value.param == "model"
    assert caught.value.name == "missing_required_parameter"
    bad = C.ToolDefinition(name="broken", parameters_json="{not json")
    with pytest.raises(InvalidRequest, match="broken"):
        chat_request(request(tools=[bad]), None)
    with pytest.raises(InvalidRequest):
        chat_request(request(tools=[C.ToolDefinition(name="list", parameters_json="[]")]), None)


# ------------------------------------------------------------------ stream side

BASE = {
    "id": "chatcmpl-Bx9",
    "object": "chat.completion.chunk",
    "created": 1767225600,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_0ba0d124f1",
}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A chunk as OpenAI streams it with include_usage (usage null until the end)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**BASE, "choices": [choice], "usage": None}


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    return {**BASE, "choices": [], "usage": usage}


def fragment(
    index: int | None, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    piece: dict[str, Any] = {"function": {"arguments": arguments}}
    if index is not None:
        piece["index"] = index
    if call_id is not None:
        piece.update(id=call_id, type="function")
        piece["function"]["name"] = name
    return piece


# Recorded from api.openai.com (ids shortened): a text reply with usage.
TEXT_STREAM = [
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "Hello"}),
    chunk({"content": "!"}),
    chunk({"content": " How can I"}),
    chunk({"content": " help?"}),
    chunk({}, "stop"),
    usage_chunk(prompt=19, completion=6, cached=8),
]

# Two parallel calls, arguments split over several chunks, as OpenAI sends them.
PARALLEL_CALLS = [
    chunk({"role": "assistant", "content": None, "refusal": None}),
    chunk({"tool_calls": [fragment(0, "", "call_W1", "get_weather")]}),
    chunk({"tool_calls": [fragment(0, '{"ci')]}),
    chunk({"tool_calls": [fragment(0, 'ty": "Pa')]}),
    chunk({"tool_calls": [fragment(0, 'ris"}')]}),
    chunk({"tool_calls": [fragment(1, "", "call_T2", "get_time")]}),
    chunk({"tool_calls": [fragment(1, '{"tz":')]}),
    chunk({"tool_calls": [fragment(1, ' "CET"}')]}),
    chunk({}, "tool_calls"),
    usage_chunk(prompt=80, completion=33),
]


def run(chunks: list[dict[str, Any]], **kwargs: Any) -> tuple[list[B.GenerateEvent], B.Finished]:
    """The events as they go out (`as_event`), and the `Finished`."""
    translator = ChunkTranslator(**kwargs)
    events = [as_event(event) for c in chunks for event in translator.feed(c)]
    return events, translator.finish().finished


def texts(events: list[B.GenerateEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")


def deltas(events: list[B.GenerateEvent]) -> list[B.ToolCallDelta]:
    return [e.tool_call_delta for e in events if e.WhichOneof("event") == "tool_call_delta"]


def test_text_stream() -> None:
    events, finished = run(TEXT_STREAM)
    assert [e.WhichOneof("event") for e in events] == ["text_delta"] * 4
    assert texts(events) == "Hello! How can I help?"
    # A text delta leaves the translator as its str: no message per token.
    translator = ChunkTranslator()
    assert [event for c in TEXT_STREAM for event in translator.feed(c)] == [
        "Hello",
        "!",
        " How can I",
        " help?",
    ]
    assert finished.reason == B.FINISH_REASON_STOP
    assert finished.usage == C.Usage(
        input_tokens=19, output_tokens=6, total_tokens=25, cached_input_tokens=8
    )
    assert not finished.tool_calls


def test_parallel_tool_calls_with_split_arguments() -> None:
    events, finished = run(PARALLEL_CALLS)
    got = deltas(events)
    assert len(got) == len(events) == 7
    # The first delta of each call carries its id and name; later ones only arguments.
    assert (got[0].index, got[0].call_id, got[0].name, got[0].arguments) == (
        0,
        "call_W1",
        "get_weather",
        "",
    )
    assert [(d.call_id, d.name) for d in got[1:4]] == [("", "")] * 3
    assert got[4].call_id == "call_T2" and got[4].index == 1
    for index in (0, 1):
        assert "".join(d.arguments for d in got if d.index == index) == (
            finished.tool_calls[index].arguments
        )
    assert finished.reason == B.FINISH_REASON_TOOL_CALLS
    assert list(finished.tool_calls) == [
        C.ToolCall(call_id="call_W1", name="get_weather", arguments='{"city": "Paris"}'),
        C.ToolCall(call_id="call_T2", name="get_time", arguments='{"tz": "CET"}'),
    ]
    assert finished.usage.output_tokens == 33 and not finished.usage.estimated


def test_interleaved_fragments_are_assembled_by_index() -> None:
    interleaved = [
        chunk({"tool_calls": [fragment(0, '{"a"', "c0", "f"), fragment(1, '{"b"', "c1", "g")]}),
        chunk({"tool_calls": [fragment(1, ": 2}")]}),
        chunk({"tool_calls": [fragment(0, ": 1}")]}),
        chunk({}, "tool_calls"),
    ]
    _, finished = run(interleaved)
    assert [(c.call_id, c.arguments) for c in finished.tool_calls] == [
        ("c0", '{"a": 1}'),
        ("c1", '{"b": 2}'),
    ]


def test_quirk_empty_first_chunk() -> None:
    # Azure OpenAI: a first chunk with no choices (prompt filter results), no usage key.
    azure_first = {"id": "", "object": "", "created": 0, "model": "", "choices": []}
    events, finished = run([azure_first, *TEXT_STREAM])
    assert texts(events) == "Hello! How can I help?"
    assert finished.usage.input_tokens == 19
    events, _ = run([{**BASE, "choices": [], "usage": None}, *TEXT_STREAM])
    assert len(events) == 4


def test_quirk_whole_tool_calls_in_one_chunk() -> None:
    # vLLM / Ollama: each call complete in one fragment, even several in one chunk.
    whole = [
        chunk({"role": "assistant", "content": ""}),
        chunk(
            {
                "tool_calls": [
                    fragment(0, '{"city": "Oslo"}', "call_1", "get_weather"),
                    fragment(1, "{}", "call_2", "get_time"),
                ]
            }
        ),
        chunk({}, "tool_calls"),
    ]
    events, finished = run(whole)
    assert [(d.index, d.call_id, d.name, d.arguments) for d in deltas(events)] == [
        (0, "call_1", "get_weather", '{"city": "Oslo"}'),
        (1, "call_2", "get_time", "{}"),
    ]
    assert len(finished.tool_calls) == 2


def test_quirk_finish_stop_after_tool_calls_means_tool_calls() -> None:
    stop_instead = [*PARALLEL_CALLS[:-2], chunk({}, "stop"), PARALLEL_CALLS[-1]]
    _, finished = run(stop_instead)
    assert finished.reason == B.FINISH_REASON_TOOL_CALLS
    assert len(finished.tool_calls) == 2


def test_quirk_missing_index() -> None:
    # No `index`: a fragment with a new id opens a call, one without continues the last.
    no_index = [
        chunk({"tool_calls": [fragment(None, '{"q":', "call_x", "search")]}),
        chunk({"tool_calls": [fragment(None, ' "cats"}')]}),
        chunk({"tool_calls": [fragment(None, "{}", "call_y", "get_time")]}),
        chunk({}, "tool_calls"),
    ]
    events, finished = run(no_index)
    assert [d.index for d in deltas(events)] == [0, 0, 1]
    assert [(c.call_id, c.name, c.arguments) for c in finished.tool_calls] == [
        ("call_x", "search", '{"q": "cats"}'),
        ("call_y", "get_time", "{}"),
    ]


def test_every_call_at_index_zero_with_distinct_ids() -> None:
    same_index = [
        chunk({"tool_calls": [fragment(0, "{}", "call_1", "a")]}),
        chunk({"tool_calls": [fragment(0, "{}", "call_2", "b")]}),
        chunk({}, "tool_calls"),
    ]
    _, finished = run(same_index)
    assert [c.name for c in finished.tool_calls] == ["a", "b"]


def test_content_null_and_odd_fragments() -> None:
    odd = [
        chunk({"role": "assistant", "content": None}),
        chunk({"content": None, "tool_calls": None}),
        # No id at all, and the name only in the second fragment: the call gets a
        # made-up id and its first delta waits until the name is known.
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ": 1}"}}]}),
        # Arguments as a JSON object (some servers) rather than a string.
        chunk(
            {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": {}}}]}
        ),
        chunk({}, "tool_calls"),
    ]
    events, finished = run(odd, call_id_prefix="call_resp1_")
    assert [(d.index, d.call_id, d.name, d.arguments) for d in deltas(events)] == [
        (0, "call_resp1_0", "f", '{"x": 1}'),
        (1, "c2", "g", "{}"),
    ]
    assert [c.call_id for c in finished.tool_calls] == ["call_resp1_0", "c2"]


def test_length_and_content_filter() -> None:
    _, finished = run([chunk({"content": "abc"}), chunk({}, "length")])
    assert finished.reason == B.FINISH_REASON_LENGTH
    _, finished = run([chunk({}, "content_filter")])
    assert finished.reason == B.FINISH_REASON_CONTENT_FILTER


def test_refusal_is_streamed_as_text() -> None:
    events, _ = run([chunk({"refusal": "I can't help with that."}), chunk({}, "stop")])
    assert texts(events) == "I can't help with that."


def test_usage_estimate_when_upstream_sends_none() -> None:
    no_usage = [c for c in TEXT_STREAM if c["choices"]]
    _, finished = run(no_usage, estimated_input_tokens=42)
    # "Hello! How can I help?" is 22 characters: ceil(22 / 4) == 6.
    assert finished.usage == C.Usage(
        input_tokens=42, output_tokens=6, total_tokens=48, estimated=True
    )
    calls_only = [c for c in PARALLEL_CALLS if c["choices"]]
    _, finished = run(calls_only)
    # Arguments '{"city": "Paris"}' (17) + '{"tz": "CET"}' (13): ceil(30 / 4) == 8.
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (0, 8)
    assert finished.usage.estimated


def test_usage_without_total_or_details() -> None:
    sparse = {**BASE, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    _, finished = run([chunk({"content": "x"}, "stop"), sparse])
    assert finished.usage == C.Usage(input_tokens=5, output_tokens=7, total_tokens=12)


def test_other_choices_are_ignored() -> None:
    second = {**BASE, "choices": [{"index": 1, "delta": {"content": "other"}}]}
    events, _ = run([chunk({"content": "mine"}), second])
    assert texts(events) == "mine"
