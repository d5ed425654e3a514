"""Unit tests of the simulator's pure core: request dicts in, plans and SSE bytes out."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tools.simulator.script import (
    FILLER_WORDS,
    Behaviour,
    Plan,
    RequestError,
    completion_body,
    error_body,
    parse_overrides,
    plan_completion,
    request_key,
    split_directives,
    stream_script,
    tokenize,
)

TWO_TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "What is 2+2?"},
]
TWO_TURNS_CORE = 'turn 2: you said "What is 2+2?"; earlier: "Hello there".'


def plan(messages: list[dict[str, Any]], defaults: Behaviour | None = None, **body: Any) -> Plan:
    request = {"model": "sim-small", "messages": messages, **body}
    return plan_completion(request, defaults or Behaviour(), completion_id="chatcmpl-t", created=7)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def events(raw: bytes) -> list[Any]:
    """Decode SSE bytes into payloads ("[DONE]" stays a string)."""
    assert raw.endswith(b"\n\n")
    out: list[Any] = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        data = block[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def all_events(p: Plan) -> list[Any]:
    script = stream_script(p)
    return events(script.head + b"".join(script.tokens) + script.tail)


# ---------------------------------------------------------------- the reply


def test_two_turn_reply_is_exact() -> None:
    p = plan(TWO_TURNS)
    # Pinned: a change in the seed, the word list or the rules must show up here.
    assert p.text == (
        TWO_TURNS_CORE + " orbit saffron garden glass fern blue timber ember nectar tulip"
        " saffron cable cable summit"
    )
    assert len(p.tokens) == 24
    assert p.finish_reason == "stop"
    assert p.last_user == "What is 2+2?"
    assert p.message_count == 3


def test_tokens_concatenate_to_the_reply_and_carry_their_leading_space() -> None:
    p = plan(TWO_TURNS)
    assert "".join(p.tokens) == p.text
    assert p.tokens[:3] == ("turn", " 2:", " you")
    assert all(t.startswith(" ") and len(t) > 1 for t in p.tokens[1:])
    assert {t.strip() for t in p.tokens[10:]} <= set(FILLER_WORDS)


def test_tokenize_keeps_every_character() -> None:
    for text in ["a", "a b", "  lead", "multi\nline  text ", "tail   "]:
        assert "".join(tokenize(text)) == text
    assert tokenize("tool x returned ok  ") == ["tool", " x", " returned", " ok  "]


def test_filler_is_deterministic_and_seeded_by_messages() -> None:
    assert plan(TWO_TURNS).text == plan(TWO_TURNS).text
    other = plan([*TWO_TURNS[:2], user("What is 2+3?")])
    assert other.text.split(".", 1)[1] != plan(TWO_TURNS).text.split(".", 1)[1]
    assert len(FILLER_WORDS) == 64 == len(set(FILLER_WORDS))


def test_core_is_never_cut_by_the_tokens_setting() -> None:
    p = plan([user("one two three four five six")], Behaviour(tokens=2))
    assert p.text == 'turn 1: you said "one two three four five six".'


def test_single_turn_with_text_parts_and_directives_removed() -> None:
    parts = [{"type": "text", "text": "how are "}, {"type": "text", "text": "you?"}]
    messages = [
        user('[[sim {"tokens": 3}]] first '),
        {"role": "user", "content": [*parts, {"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    p = plan(messages, Behaviour(tokens=10))
    # The earlier user's directive is stripped from its text but does not apply.
    assert p.text.startswith('turn 2: you said "how are you?"; earlier: "first".')
    assert len(p.tokens) == 10


def test_only_the_last_user_directive_applies() -> None:
    messages = [user('a [[sim {"tokens": 3}]]'), user('b [[sim {"tokens": 12, "ttft_ms": 7}]]')]
    p = plan(messages)
    assert len(p.tokens) == 12
    assert p.behaviour.ttft_ms == 7
    assert p.last_user == "b"


def test_tool_result_reply_names_the_tool() -> None:
    messages = [
        user(
            'weather? [[sim {"tool_calls": [{"name": "get_weather"}], "tokens": 6, "status": 500}]]'
        ),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    p = plan(messages)
    # A tool result never triggers new tool calls; only timing keys (tokens) apply.
    assert p.tool_calls == ()
    assert p.behaviour.status is None
    assert p.text.startswith("tool get_weather returned sunny, 21C ")
    assert len(p.tokens) == 6


def test_tool_loop_calls_again_after_each_tool_result() -> None:
    directive = '[[sim {"tool_calls": [{"name": "spin"}], "tool_loop": true}]]'
    first = plan([user(f"go {directive}")])
    call = {"id": first.tool_calls[0].id, "type": "function", "function": {"name": "spin"}}
    second = plan(
        [
            user(f"go {directive}"),
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{}"},
        ]
    )
    assert [c.name for c in second.tool_calls] == ["spin"]
    # A new request, so a new call id: a loop, not a replay.
    assert second.tool_calls[0].id != first.tool_calls[0].id


def test_tool_result_for_an_unknown_call_uses_question_mark() -> None:
    p = plan([user("x"), {"role": "tool", "tool_call_id": "nope", "content": "42"}])
    assert p.text.startswith("tool ? returned 42")


def test_last_message_not_from_user_or_tool() -> None:
    p = plan([user("x"), {"role": "assistant", "content": "y"}], Behaviour(tokens=1))
    assert p.text == "turn 1: nothing to answer."


def test_echo_context_appends_the_message_count() -> None:
    p = plan([user("a"), user('b [[sim {"echo_context": true}]]')], Behaviour(tokens=0))
    assert p.text == 'turn 2: you said "b"; earlier: "a". context=2'


# ---------------------------------------------------------------- usage and limits


def test_usage_numbers() -> None:
    messages = [
        user("12345678"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]  # 45 characters of JSON
    p = plan(messages, tools=tools)
    assert p.prompt_tokens == 16  # ceil((8 + 7 + 2 + 45) / 4)
    assert p.completion_tokens == 24
    assert plan([user("")], Behaviour(tokens=0)).prompt_tokens == 1


def test_max_tokens_stops_with_length() -> None:
    p = plan(TWO_TURNS, max_tokens=5)
    assert p.tokens == ("turn", " 2:", " you", " said", ' "What')
    assert (p.finish_reason, p.completion_tokens) == ("length", 5)
    # max_completion_tokens wins over the legacy max_tokens.
    assert plan(TWO_TURNS, max_tokens=5, max_completion_tokens=3).completion_tokens == 3
    assert plan(TWO_TURNS, max_tokens=24).finish_reason == "stop"


def test_max_tokens_truncates_tool_call_arguments() -> None:
    calls = '[{"name": "a", "arguments": {"text": "0123456789012345678901234"}}, {"name": "b"}]'
    p = plan([user(f'[[sim {{"tool_calls": {calls}}}]]')], max_tokens=4)
    # 4 tokens = 16 characters of arguments; the second call is never started.
    assert [c.arguments for c in p.tool_calls] == ['{"text":"0123456']
    assert (p.finish_reason, p.completion_tokens) == ("length", 4)


# ---------------------------------------------------------------- tool calls and quirks

CALLS = (
    '[[sim {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},'
    ' {"name": "lookup", "arguments": "{\\"q\\": \\"x]]y\\"}", "id": "call_fixed"}]}]]'
)


def reassemble(p: Plan) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for event in all_events(p):
        if event == "[DONE]" or not event["choices"]:
            continue
        for delta in event["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"arguments": ""})
            if "id" in delta:
                call.update(id=delta["id"], name=delta["function"]["name"], type=delta["type"])
            call["arguments"] += delta["function"]["arguments"]
    return calls


def test_tool_call_fragments_reassemble_to_the_arguments() -> None:
    p = plan([user("go " + CALLS)])
    assert p.text == ""
    assert p.finish_reason == "tool_calls"
    calls = reassemble(p)
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert json.loads(calls[1]["arguments"]) == {"q": "x]]y"}
    assert calls[0]["id"] == "call_" + hashlib.sha256(f"{p.request_key}0".encode()).hexdigest()[:12]
    assert calls[1]["id"] == "call_fixed"
    assert [c["name"] for c in calls.values()] == ["get_weather", "lookup"]
    # 1 header + ceil(27 / 5) fragments, then 1 header + ceil(13 / 5) fragments.
    assert len(stream_script(p).tokens) == 1 + 6 + 1 + 3
    assert p.completion_tokens == 10  # ceil((27 + 13) / 4)
    finals = [e for e in all_events(p) if e != "[DONE]" and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finals] == ["tool_calls"]


def test_args_chunk_sets_the_fragment_size() -> None:
    directive = '[[sim {"tool_calls": [{"name": "f", "arguments": {"a": 1}}], "args_chunk": 2}]]'
    script = stream_script(plan([user(directive)]))
    fragments = [json.loads(e[6:])["choices"][0]["delta"] for e in script.tokens[1:]]
    assert [f["tool_calls"][0]["function"]["arguments"] for f in fragments] == [
        '{"',
        'a"',
        ":1",
        "}",
    ]


def test_quirk_single_chunk() -> None:
    p = plan([user(CALLS.replace("]}]]", '], "quirk": "single_chunk"}]]'))])
    script = stream_script(p)
    assert len(script.tokens) == 2
    first = json.loads(script.tokens[0][6:])["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'}
    assert first["id"].startswith("call_")


def test_quirk_finish_stop() -> None:
    p = plan([user(CALLS.replace("]}]]", '], "quirk": "finish_stop"}]]'))])
    assert p.finish_reason == "stop"
    assert len(p.tool_calls) == 2
    assert json.loads(completion_body(p))["choices"][0]["finish_reason"] == "stop"


def test_quirk_empty_first_chunk() -> None:
    p = plan(
        [user('hi [[sim {"quirk": "empty_first_chunk"}]]')], stream_options={"include_usage": True}
    )
    first, second = all_events(p)[:2]
    assert first["choices"] == []
    assert "usage" not in first
    assert second["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# ---------------------------------------------------------------- rendering


def test_stream_events_follow_openai_chunk_format() -> None:
    p = plan(TWO_TURNS, stream=True, stream_options={"include_usage": True})
    out = all_events(p)
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-t"
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["created"], chunk["model"], chunk["system_fingerprint"]) == (
            7,
            "sim-small",
            "sim",
        )
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:25]]
    assert "".join(content) == p.text
    assert chunks[25]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["usage"] is None for c in chunks[:26])
    assert chunks[26]["choices"] == []
    assert chunks[26]["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 24,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert len(chunks) == 27


def test_stream_without_include_usage_has_no_usage_key() -> None:
    chunks = all_events(plan(TWO_TURNS, stream=True))[:-1]
    assert len(chunks) == 26
    assert all("usage" not in c for c in chunks)


def test_completion_body() -> None:
    body = json.loads(completion_body(plan(TWO_TURNS)))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == plan(TWO_TURNS).text
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "tool_calls" not in body["choices"][0]["message"]
    assert body["usage"]["total_tokens"] == 31


def test_error_body_is_openai_shaped() -> None:
    assert json.loads(error_body(429, "slow down")) == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }
    assert json.loads(error_body(503, "x"))["error"]["type"] == "server_error"
    assert json.loads(error_body(401, "x"))["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------- directives and validation


def test_split_directives() -> None:
    assert split_directives("plain  ") == ("plain", {})
    assert split_directives("see [[simple]] ") == ("see [[simple]]", {})
    text, raw = split_directives('a [[sim {"tokens": 1}]] b [[sim{"tokens": 2, "ttft_ms": 0}]]')
    assert (text, raw) == ("a  b", {"tokens": 2, "ttft_ms": 0})


@pytest.mark.parametrize(
    "directive",
    [
        "[[sim {not json}]]",
        "[[sim [1, 2]]]",
        '[[sim {"tokens": 1} trailing]]',
        '[[sim {"tokens": 1}',
        '[[sim {"nope": 1}]]',
        '[[sim {"tokens": true}]]',
        '[[sim {"tokens": -1}]]',
        '[[sim {"status": 200}]]',
        '[[sim {"quirk": "weird"}]]',
        '[[sim {"quirk": ["single_chunk"]}]]',
        '[[sim {"tool_calls": [{"arguments": {}}]}]]',
        '[[sim {"echo_context": 1}]]',
    ],
)
def test_invalid_directives_are_rejected(directive: str) -> None:
    with pytest.raises(RequestError):
        plan([user(directive)])


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"model": "m", "messages": ["x"]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ],
)
def test_invalid_requests_are_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError):
        plan_completion(body, Behaviour(), completion_id="c", created=0)


def test_parse_overrides_accepts_every_key() -> None:
    raw = {
        "ttft_ms": 1,
        "token_delay_ms": 2,
        "tokens": 3,
        "status": 429,
        "retry_after": 1.5,
        "retry_after_ms": 1500,
        "fail_times": 2,
        "disconnect_after": 4,
        "tool_calls": [{"name": "f", "arguments": "not json", "id": "c1"}],
        "args_chunk": 9,
        "quirk": "finish_stop",
        "echo_context": True,
    }
    parsed = parse_overrides(raw)
    assert parsed["tool_calls"][0].arguments == "not json"  # strings are sent verbatim
    assert parse_overrides({"status": None})["status"] is None


def test_request_key_covers_model_and_messages_only() -> None:
    key = plan(TWO_TURNS, stream=True, temperature=0.2).request_key
    assert key == request_key("sim-small", TWO_TURNS)
    assert key != request_key("other", TWO_TURNS)
