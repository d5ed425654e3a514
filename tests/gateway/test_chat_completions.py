"""`POST /v1/chat/completions` in-process: the real app over the in-memory
backends (real Redis for limits), uvicorn on port 0, the official `openai` SDK
(sync and async) and a raw HTTP client for what the SDK hides."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from switchboard.gateway import bounds
from switchboard.gateway.testing import reply
from switchboard.gateway.testing.model import Call, Fail, Finish, Script, Text, Wait
from tests.gateway.test_app import KEY, Gateway

MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello?"},
]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@dataclass
class Raw:
    """An HTTP answer as a raw client sees it (header names in lower case)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[dict[str, str]]:
        """The SSE events of the body, each as its fields."""
        events = []
        for block in self.body.decode().split("\n\n"):
            fields = dict(line.partition(": ")[::2] for line in block.splitlines() if line)
            if fields:
                events.append(fields)
        return events


async def post(
    gateway: Gateway,
    body: Any,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> Raw:
    """POST `body` (JSON, or bytes as they are) with the tenant's key."""
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://{gateway.url}{path}", data=io.BytesIO(data), headers=sent) as response,
    ):
        headers = {name.lower(): value for name, value in response.headers.items()}
        return Raw(response.status, headers, await response.read())


async def test_the_sdk_streams_text_with_usage(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    gateway.backends.model.queue(reply("Hello", " from", " SSE."))
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from SSE."
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 10 and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    # The messages became the session's conversation, in order.
    request = gateway.backends.model.requests[-1]
    roles = [item.role for item in request.context.items]
    assert len(roles) == 2 and request.model == "gpt-4o-mini"
    # Read with the last message as it was stored, not by a BuildContext of its own.
    assert gateway.backends.calls["build_context"] == 0
    assert gateway.backends.calls["append_item"] == 3  # the two messages, the answer


async def test_the_sdk_gets_a_whole_completion_without_stream(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(reply("All", " at once."))
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=50, temperature=0.5
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "All at once."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 15
    request = gateway.backends.model.requests[-1]
    assert request.max_output_tokens == 50 and request.temperature == 0.5


async def test_the_sync_sdk_streams_in_a_thread(gateway: Gateway) -> None:
    gateway.backends.model.queue(reply("sync", " works"))
    sync = openai.OpenAI(api_key=KEY, base_url=f"http://{gateway.url}/v1", max_retries=0)

    def consume() -> str:
        with sync:
            stream = sync.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(consume) == "sync works"


async def test_tool_call_deltas_stream_as_openai_shapes_them(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(
        Script(
            [
                Call(0, "call_1", "get_weather", '{"ci'),
                Call(0, "", "", 'ty": "Paris"}'),
                Finish("tool_calls"),
            ]
        )
    )
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    first = deltas[0][0]
    assert (first.index, first.id, first.type) == (0, "call_1", "function")
    assert first.function is not None and first.function.name == "get_weather"
    arguments = "".join(d[0].function.arguments or "" for d in deltas if d[0].function)
    assert arguments == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The tool result goes back as a tool message; the model sees the call and its output.
    gateway.backends.model.queue(reply("Sunny."))
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
        ],
        tools=[WEATHER_TOOL],
    )
    assert completion.choices[0].message.content == "Sunny."
    items = gateway.backends.model.requests[-1].context.items
    assert [item.call_id for item in items[-2:]] == ["call_1", "call_1"]


async def test_a_whole_completion_carries_its_tool_calls(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(
        Script([Call(0, "call_9", "get_weather", '{"city": "Oslo"}'), Finish("tool_calls")])
    )
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL]
    )
    message = completion.choices[0].message
    assert message.content is None and message.tool_calls is not None
    assert message.tool_calls[0].id == "call_9"
    assert message.tool_calls[0].function.arguments == '{"city": "Oslo"}'  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


async def test_every_event_has_an_id_and_the_stream_ends_with_done(gateway: Gateway) -> None:
    gateway.backends.model.queue(reply("a", "b"))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    answer = await post(gateway, body)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = answer.events()
    assert all(event.get("id") for event in events)
    assert len({event["id"] for event in events}) == len(events)
    assert events[-1]["data"] == "[DONE]"
    assert orjson.loads(events[0]["data"])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"messages": MESSAGES}, 400, "missing_required_parameter", "model"),
        ({"model": "m"}, 400, "missing_required_parameter", "messages"),
        ({"model": "m", "messages": "hi"}, 400, "invalid_value", "messages"),
        ({"model": "m", "messages": MESSAGES, "n": 2}, 400, "unsupported_feature", "n"),
        ({"model": "m", "messages": MESSAGES, "stop": ["x"]}, 400, "unsupported_feature", "stop"),
        ({"model": "m", "messages": MESSAGES, "top_p": 0.5}, 400, "unsupported_feature", "top_p"),
        ({"model": "m", "messages": MESSAGES, "bogus": 1}, 400, "unknown_parameter", "bogus"),
        (
            {"model": "m", "messages": MESSAGES, "temperature": "hot"},
            400,
            "invalid_value",
            "temperature",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "unsupported_feature",
            "messages[0].content[0].type",
        ),
        (
            {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_value",
            "messages[0].role",
        ),
        (
            {"model": "m", "messages": MESSAGES, "response_format": {"type": "json_object"}},
            400,
            "unsupported_feature",
            "response_format",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(
    gateway: Gateway, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    answer = await post(gateway, body)
    assert answer.status == status
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert gateway.backends.model.requests == []


async def test_malformed_json_and_oversized_bodies(gateway: Gateway) -> None:
    answer = await post(gateway, b'{"model": ')
    assert (answer.status, answer.json()["error"]["code"]) == (400, "invalid_json")
    answer = await post(gateway, b"[" * 100 + b"]" * 100)
    assert (answer.status, answer.json()["error"]["code"]) == (400, "json_too_deep")
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (5 << 20)
    answer = await post(gateway, huge + b'"}]}')
    assert (answer.status, answer.json()["error"]["code"]) == (413, "frame_too_large")
    too_many = [{"role": "user", "content": "x"}] * 1025
    answer = await post(gateway, {"model": "m", "messages": too_many})
    assert answer.json()["error"]["code"] == "value_too_large"
    # Nothing else was affected: the next request is served.
    gateway.backends.model.queue(reply("fine"))
    answer = await post(gateway, {"model": "m", "messages": MESSAGES})
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "fine"


async def test_a_bad_key_is_the_sdks_authentication_error(gateway: Gateway) -> None:
    wrong = openai.AsyncOpenAI(
        api_key="sk-sb-wrong", base_url=f"http://{gateway.url}/v1", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as refused:
        async with wrong:
            await wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert refused.value.code == "invalid_api_key"


async def test_a_failure_before_the_first_token_is_an_http_status(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(Script([Fail("server_busy", "Too busy.")]))
    with pytest.raises(openai.InternalServerError) as refused:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert refused.value.status_code == 503 and refused.value.code == "server_busy"


async def test_a_failure_after_the_first_token_is_an_error_in_the_stream(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    gateway.backends.model.queue(Script([Text("Half"), Fail("upstream_stream_broken", "Cut.")]))
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text: list[str] = []

    async def read() -> None:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as failed:
        await read()
    assert "".join(text) == "Half"
    assert failed.value.code == "upstream_stream_broken"


async def test_a_client_that_disconnects_cancels_the_model_call(
    gateway: Gateway, sdk: openai.AsyncOpenAI
) -> None:
    release = asyncio.Event()
    gateway.backends.model.queue(Script([Text("first"), Wait(release), Text("never")]))
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content == "first":
            break
    await stream.close()
    model = gateway.backends.model
    # Not a wall-clock bound: the cancel is made on the disconnect itself, before
    # the call could go on (it waits on `release`, which is never set).
    for _ in range(200):
        if model.cancelled:
            break
        await asyncio.sleep(0.005)
    assert model.cancelled == [model.requests[-1].response_id]


async def test_a_slow_upload_gets_408_and_nothing_else_is_affected(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bounds, "BODY_TIMEOUT_S", 0.3)
    host, port = gateway.url.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        + b'{"model": "m", '
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    gateway.backends.model.queue(reply("still here"))
    answer = await post(gateway, {"model": "m", "messages": MESSAGES})
    assert answer.json()["choices"][0]["message"]["content"] == "still here"


async def test_an_ephemeral_secret_serves_its_own_model_only(gateway: Gateway) -> None:
    minted = await post(
        gateway,
        {"session": {"type": "realtime", "model": "gpt-realtime"}},
        "/v1/realtime/client_secrets",
    )
    secret = minted.json()["value"]
    as_browser = {"Authorization": f"Bearer {secret}"}
    gateway.backends.model.queue(reply("hi"))
    answer = await post(
        gateway, {"model": "gpt-realtime", "messages": MESSAGES}, headers=as_browser
    )
    assert answer.json()["choices"][0]["message"]["content"] == "hi"
    answer = await post(gateway, {"model": "gpt-4o", "messages": MESSAGES}, headers=as_browser)
    assert (answer.status, answer.json()["error"]["code"]) == (403, "field_locked")
