"""`ChatStream` on the wire: what the broker sends upstream and how answers map to errors.

Against a real aiohttp server on 127.0.0.1:0 whose handlers answer what the
simulator cannot (redirects, huge or non-JSON error bodies, a stream that is
not SSE, silence before the headers); the simulator covers the rest
(test_service.py, test_faults.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from switchboard.broker.chat_stream import (
    MAX_ERROR_BODY,
    SseDecoder,
    read_error,
    request_error,
)
from switchboard.broker.clients import UpstreamClient, env_proxy, keepalive_socket
from switchboard.broker.retry import TransientUpstreamError
from switchboard.broker.translate import ChunkTranslator, text_only
from switchboard.config import BrokerSettings, Secret
from switchboard.errors import UpstreamError, UpstreamStreamBroken, UpstreamTimeout
from switchboard.tenancy import Upstream

KEY = "sk-chat-stream-test-0123456789abcdef"
PAYLOAD = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstreams:
    """A real HTTP server on 127.0.0.1:0 whose `/v1/chat/completions` runs `handler`."""

    def __init__(self) -> None:
        self.handler: Handler = self._sse
        self.requests: list[tuple[dict[str, str], dict[str, Any], Any]] = []
        self.hits: dict[str, int] = {}
        self.url = ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append((dict(request.headers), body, peer))
        return await self.handler(request)

    async def _elsewhere(self, request: web.Request) -> web.StreamResponse:
        self.hits["elsewhere"] = self.hits.get("elsewhere", 0) + 1
        return web.Response(text="should never be reached")

    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": "req-1"}
        )
        await response.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._dispatch)
        app.router.add_route("*", "/elsewhere", self._elsewhere)
        return app


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    server = Upstreams()
    # handler_cancellation: a handler left waiting ends when its client goes away.
    runner = web.AppRunner(server.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


async def client_for(
    upstreams: Upstreams, key: str = KEY, **env: str
) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient.build(
        Upstream("one", upstreams.url + "/v1/", Secret(key)), BrokerSettings.from_environ(env)
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client(upstreams: Upstreams) -> AsyncIterator[UpstreamClient]:
    async for built in client_for(upstreams):
        yield built


async def chunks_of(client: UpstreamClient) -> list[dict[str, Any]]:
    async with client.stream(PAYLOAD) as stream:
        return [chunk async for chunk in stream]


async def test_the_request_is_a_streamed_json_post_with_the_key(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    chunks = await chunks_of(client)
    assert chunks == [{"choices": [{"index": 0, "delta": {"content": "hi"}}]}]
    ((headers, body, _),) = upstreams.requests
    assert body == PAYLOAD
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "text/event-stream"
    assert headers["User-Agent"] == "switchboard-broker"
    assert client.active == 0


async def test_no_key_sends_no_authorization(upstreams: Upstreams) -> None:
    async for client in client_for(upstreams, key=""):
        await chunks_of(client)
    ((headers, _, _),) = upstreams.requests
    assert "Authorization" not in headers


async def test_a_finished_stream_leaves_its_connection_in_the_pool(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    for _ in range(3):
        await chunks_of(client)
    peers = {peer for _, _, peer in upstreams.requests}
    assert len(peers) == 1


async def test_the_request_id_is_the_upstreams(client: UpstreamClient) -> None:
    async with client.stream(PAYLOAD) as stream:
        assert stream.request_id == "req-1"


async def test_an_echoed_key_never_reaches_the_message(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        message = f"Unknown parameter for key {KEY} (and sk-proj-abcdefghijkl)."
        return web.json_response({"error": {"message": message}}, status=400)

    upstreams.handler = refuse
    with pytest.raises(UpstreamError) as caught:
        await chunks_of(client)
    message = str(caught.value)
    assert message.startswith("The upstream refused the request (HTTP 400): Unknown parameter")
    assert KEY not in message
    assert "abcdefghijkl" not in message
    assert client.active == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>Bad Gateway config</html>", id="not-json"),
        pytest.param(
            orjson.dumps({"error": {"message": "x" * (2 * MAX_ERROR_BODY)}}), id="over-64KiB"
        ),
    ],
)
async def test_an_error_body_that_is_not_a_short_json_object_gives_no_detail(
    client: UpstreamClient, upstreams: Upstreams, body: bytes
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=422, content_type="application/json")

    upstreams.handler = refuse
    with pytest.raises(UpstreamError) as caught:
        await chunks_of(client)
    assert str(caught.value) == "The upstream refused the request (HTTP 422)."


async def test_a_redirect_is_not_followed(client: UpstreamClient, upstreams: Upstreams) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(upstreams.url + "/elsewhere")

    upstreams.handler = redirect
    with pytest.raises(UpstreamError) as caught:
        await chunks_of(client)
    assert "HTTP 307" in str(caught.value)
    assert upstreams.hits == {}  # the key never went to the other address


async def test_a_body_that_is_not_an_event_stream_is_a_broken_stream(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    async def json_reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [{"message": {"content": "hi"}}]})

    upstreams.handler = json_reply
    with pytest.raises(UpstreamStreamBroken, match="ended before it was complete"):
        await chunks_of(client)


async def test_silence_before_the_headers_is_a_timeout(upstreams: Upstreams) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    upstreams.handler = silent
    async for client in client_for(upstreams, SWITCHBOARD_BROKER_READ_TIMEOUT_S="0.2"):
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            await chunks_of(client)
        assert client.active == 0


async def test_a_dropped_connection_before_the_headers_is_unreachable(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()

    upstreams.handler = drop
    with pytest.raises(TransientUpstreamError, match="unreachable") as caught:
        await chunks_of(client)
    assert caught.value.reason == "connection"


def test_transport_errors_map_by_cause() -> None:
    assert isinstance(request_error(TimeoutError()), UpstreamTimeout)
    assert isinstance(request_error(ConnectionRefusedError()), TransientUpstreamError)
    wrapped = OSError("read failed")
    wrapped.__cause__ = TimeoutError()
    assert isinstance(read_error(wrapped), UpstreamTimeout)
    assert isinstance(read_error(ConnectionResetError()), UpstreamStreamBroken)


def test_upstream_sockets_have_tcp_keepalive() -> None:
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0))
    with keepalive_socket(info) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_sse_decoder_gives_the_same_events_at_every_split_point() -> None:
    body = (
        b'data: {"a":1}\n\n\n'  # an extra blank line
        b"data:no-space\n\n"
        b": comment\ndata: after a comment\n\n"
        b"data: one\r\ndata: two\r\n\r\n"
        b"event: x\rdata: cr only\r\r"
        b"data: \n\n"  # empty data: not an event
        b"data: [DONE]"  # unterminated: returned by close()
    )
    expected = [
        b'{"a":1}',
        b"no-space",
        b"after a comment",
        b"one\ntwo",
        b"cr only",
        b"[DONE]",
    ]
    for split in range(len(body) + 1):
        decoder = SseDecoder()
        events = decoder.feed(body[:split]) + decoder.feed(body[split:]) + decoder.close()
        assert events == expected, split


def test_sse_decoder_takes_a_read_of_one_whole_event_as_it_is() -> None:
    # A paced upstream sends one event per read: the decoder's shortcut.
    decoder = SseDecoder()
    reads = [b'data: {"a":1}\n\n', b"data: \n\n", b"data: x\n", b"\n", b"data: y\n\n"]
    assert [decoder.feed(data) for data in reads] == [[b'{"a":1}'], [], [], [b"x"], [b"y"]]
    # Two events in one read, or one with two lines, take the general way.
    assert decoder.feed(b"data: a\n\ndata: b\n\n") == [b"a", b"b"]
    assert decoder.feed(b"data: a\ndata: b\n\n") == [b"a\nb"]
    assert decoder.close() == []


def test_the_proxy_comes_from_the_environment_unless_no_proxy_exempts_the_host() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128", "http_proxy": "http://plain:8080"}
    assert env_proxy("https://api.openai.com/v1", env) == "http://proxy:3128"
    assert env_proxy("http://vllm:8000/v1", env) == "http://plain:8080"
    assert env_proxy("https://api.openai.com/v1", {**env, "NO_PROXY": "x,.openai.com"}) is None
    assert env_proxy("http://vllm:8000/v1", {**env, "no_proxy": "*"}) is None
    assert env_proxy("https://api.openai.com/v1", {}) is None


async def test_requests_go_through_the_proxy_of_the_environment(
    upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test server stands in for the proxy: a proxied request reaches it in
    # absolute form, for a host that does not resolve.
    monkeypatch.setenv("HTTP_PROXY", upstreams.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = UpstreamClient.build(
        Upstream("one", "http://upstream.invalid/v1", Secret(KEY)), BrokerSettings.from_environ({})
    )
    try:
        assert await chunks_of(client) == [{"choices": [{"index": 0, "delta": {"content": "hi"}}]}]
    finally:
        await client.aclose()
    ((headers, _, _),) = upstreams.requests
    assert headers["Host"] == "upstream.invalid"


# ------------------------------------------- the text-only chunk fast path (`ChatStream.read`)

ENVELOPE = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'


def text_chunk(text: str, tail: bytes = b',"logprobs":null,"finish_reason":null}]}') -> bytes:
    """A compact text-only chunk as OpenAI, vLLM and the simulator write them."""
    delta = orjson.dumps({"content": text})
    return ENVELOPE + b'"choices":[{"index":0,"delta":' + delta + tail


# Chunks a stream may hold, in an order that exercises every way out of the fast path.
FAST_PATH_CHUNKS = [
    ENVELOPE + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    text_chunk("Hello"),  # learnt
    text_chunk(" world"),  # taken as text
    text_chunk(""),
    text_chunk('a "quote"'),  # escaped: decoded in full
    text_chunk("back\\slash"),
    text_chunk("new\nline"),
    text_chunk("tab\there"),
    text_chunk("caf\u00e9 \u4e16\u754c \U0001f600"),  # non-ASCII, printable: taken as text
    text_chunk("zero\u200dwidth"),  # unprintable: decoded in full
    text_chunk("\u2028"),
    text_chunk("x", b',"logprobs":null,"finish_reason":"length"}]}'),  # another shape
    text_chunk("after"),
    ENVELOPE + b'"choices":[{"index":0,"delta":{"content":"sp"} ,"finish_reason":null}]}',
    ENVELOPE
    + b'"choices":[{"index":0,"delta":{"content":"a"},"extra":{"delta":{"content":"b"}}}]}',
    text_chunk("last"),
    ENVELOPE + b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}',
]


def sse_body(chunks: list[bytes]) -> bytes:
    return b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


async def fed(client: UpstreamClient) -> tuple[list[Any], ChunkTranslator, int]:
    """The events a translator makes of the stream read with `read()`, and how many
    chunks came as text."""
    translator = ChunkTranslator()
    events: list[Any] = []
    texts = 0
    async with client.stream(PAYLOAD) as stream:
        while (chunks := await stream.read()) is not None:
            for chunk in chunks:
                texts += isinstance(chunk, str)
                events.extend(translator.feed(chunk))
    return events, translator, texts


@pytest.mark.parametrize("one_write_per_chunk", [True, False])
async def test_text_only_chunks_read_as_text_translate_as_their_json_does(
    client: UpstreamClient, upstreams: Upstreams, one_write_per_chunk: bool
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        body = sse_body(FAST_PATH_CHUNKS)
        if one_write_per_chunk:
            for event in body.split(b"\n\n")[:-1]:
                await response.write(event + b"\n\n")
                await asyncio.sleep(0.001)
        else:
            await response.write(body)
        await response.write_eof()
        return response

    upstreams.handler = stream
    events, translator, texts = await fed(client)

    expected = ChunkTranslator()
    expected_events = [e for c in FAST_PATH_CHUNKS for e in expected.feed(orjson.loads(c))]
    assert events == expected_events
    assert translator.finish() == expected.finish()
    assert (translator.response_model, translator.response_id) == ("m", "chatcmpl-1")
    # " world", "", the non-ASCII text and "after" as text; each other text
    # chunk is a shape learnt, escaped, unprintable or not text-only.
    assert texts == 4


async def test_iterating_gives_every_chunk_as_its_json(
    client: UpstreamClient, upstreams: Upstreams
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_body(FAST_PATH_CHUNKS))
        await response.write_eof()
        return response

    upstreams.handler = stream
    assert await chunks_of(client) == [orjson.loads(c) for c in FAST_PATH_CHUNKS]


def test_text_only_is_a_chunk_whose_one_effect_is_its_text() -> None:
    def chunk(**choice: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, **choice}]}

    assert text_only(chunk(delta={"content": "hi"})) == "hi"
    assert text_only(chunk(delta={"content": "hi"}, finish_reason=None)) == "hi"
    assert text_only({**chunk(delta={"content": "hi"}), "usage": None}) == "hi"
    assert text_only(chunk(delta={"content": "hi"}, finish_reason="stop")) is None
    assert text_only({**chunk(delta={"content": "hi"}), "usage": {"total_tokens": 1}}) is None
    assert text_only(chunk(delta={"content": "hi", "role": "assistant"})) is None
    assert text_only(chunk(delta={"refusal": "no"})) is None
    assert text_only(chunk(delta={"content": None})) is None
    assert text_only({"choices": [{"index": 1, "delta": {"content": "hi"}}]}) is None
    two = {"choices": [{"index": 0, "delta": {"content": "a"}}] * 2}
    assert text_only(two) is None


# ------------------------------------------- the read timeout while the body is read


def paused_body(pause_s: float) -> Handler:
    """A stream that sends one chunk, is silent for `pause_s`, then ends."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + text_chunk("one") + b"\n\n")
        await asyncio.sleep(pause_s)
        await response.write(b"data: " + text_chunk("two") + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    return handler


async def test_silence_between_chunks_is_a_timeout(upstreams: Upstreams) -> None:
    upstreams.handler = paused_body(5)
    async for client in client_for(upstreams, SWITCHBOARD_BROKER_READ_TIMEOUT_S="0.2"):
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="stopped sending"):
            await fed(client)
        assert time.monotonic() - started < 3
        assert client.active == 0


async def test_time_spent_not_reading_is_not_silence(upstreams: Upstreams) -> None:
    # The upstream is silent for 1 s, longer than the timeout, while the reader
    # is busy elsewhere (a full follower) for 0.9 s of it: it waits 0.1 s at most.
    upstreams.handler = paused_body(1.0)
    translator = ChunkTranslator()
    texts: list[Any] = []
    async for client in client_for(upstreams, SWITCHBOARD_BROKER_READ_TIMEOUT_S="0.5"):
        async with client.stream(PAYLOAD) as stream:
            while (chunks := await stream.read()) is not None:
                for chunk in chunks:
                    texts += translator.feed(chunk)
                if texts == ["one"]:
                    await asyncio.sleep(0.9)
    assert texts == ["one", "two"]
