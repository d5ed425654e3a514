"""The Python SDK (clients/python) against the real stack: responses cut at random
points (seeded, printed) by a dropped socket, a drain and a killed gateway come
out whole, exactly once, marked `resumed`; terminal refusals are not retried; a
refused or expiring secret is refreshed through the token provider."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import signal
import time
from collections import Counter
from typing import Any

import pytest

from switchboard_client import (
    AuthenticationError,
    Backoff,
    ClientSecret,
    ConnectionState,
    RealtimeClient,
    ServerEvent,
    StateChange,
    Tool,
)
from tests.clients.conftest import gateway_serving, gateway_urls, mint_secret
from tools.stack import Stack

PROMPT = 'resume me [[sim {"tokens": 60, "token_delay_ms": 8}]]'


def client_for(stack: Stack, states: list[StateChange] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("api_key", stack.dev_key)
    return RealtimeClient(
        gateway_urls(stack),
        backoff=Backoff(base_s=0.05, max_s=0.5, max_attempts=40),
        on_state=states.append if states is not None else None,
        **kwargs,
    )


async def uninterrupted(stack: Stack, prompt: str) -> str:
    """The reply to `prompt` in a new session (the simulator's reply is a function
    of the conversation)."""
    async with client_for(stack) as client:
        stream = client.stream_text(prompt)
        async for _ in stream:
            pass
        assert not stream.response.resumed
        return stream.response.text


class Seen:
    """What the application saw: every event, to count repeats."""

    def __init__(self) -> None:
        self.events: list[ServerEvent] = []

    def repeats(self) -> int:
        counts = Counter(e.event_id for e in self.events if e.event_id)
        return sum(n - 1 for n in counts.values())

    def text(self) -> str:
        return "".join(e.delta for e in self.events if e.type == "response.output_text.delta")


async def read_response(client: RealtimeClient, seen: Seen, cut: Any = None) -> ServerEvent:
    """Read events up to `response.done`; `cut(event)` may act on each."""
    async for event in client.events():
        seen.events.append(event)
        if cut is not None:
            cut(event)
        if event.type == "response.done":
            return event
    raise AssertionError("events ended")


async def test_dropped_sockets_at_random_points_lose_and_repeat_nothing(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    expected = await uninterrupted(stack, PROMPT)
    cuts = resumed = 0
    duplicates = 0
    for trial in range(6):
        context = f"seed {seed}, trial {trial}"
        async with client_for(stack) as client:
            seen = Seen()
            cut_after = rng.randrange(1, 60)
            count = 0

            def cut(event: ServerEvent, cut_after: int = cut_after) -> None:
                nonlocal count, cuts
                count += 1
                if count == cut_after and event.type != "response.done":
                    # A cut before `response.created` loses no response: not counted.
                    cuts += client.tracker.streaming
                    client.drop_connection()

            await client.add_text(PROMPT)
            await client.create_response()
            done = await read_response(client, seen, cut)
            assert done.response is not None
            assert done.response.status == "completed", context
            assert seen.text() == expected == done.response.text, context
            assert seen.repeats() == 0, context
            resumed += done.response.resumed
            duplicates += client.tracker.duplicates
            # The session goes on after the resume.
            stream = client.stream_text("and now?")
            async for _ in stream:
                pass
            assert stream.response.status == "completed", context
    print(
        f"\npython sdk, dropped sockets: seed {seed}, cuts {cuts}, resumed {resumed}, "
        f"duplicates found {duplicates}"
    )
    assert resumed == cuts > 0
    assert duplicates == 0


async def test_a_voice_sessions_reply_audio_comes_out_whole_across_a_cut(stack: Stack) -> None:
    reply_ms = 3000
    async with client_for(stack, model="gpt-realtime-voice") as client:
        instructions = f'[[sim {{"audio_ms": {reply_ms}}}]]'
        await client.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "instructions": instructions},
            }
        )
        await client.add_text("tell me about Paris")
        await client.create_response()
        seen = Seen()
        deltas = 0

        def cut(event: ServerEvent) -> None:
            nonlocal deltas
            if event.type == "response.output_audio.delta":
                deltas += 1
                if deltas == 5:
                    client.drop_connection()

        done = await read_response(client, seen, cut)
        assert done.response is not None
        assert done.response.status == "completed"
        assert done.response.resumed
        assert seen.repeats() == 0
        audio = b"".join(
            base64.b64decode(event.data["delta"])
            for event in seen.events
            if event.type == "response.output_audio.delta"
        )
        assert len(audio) == reply_ms * 48  # 24 kHz PCM16
        # The session goes on.
        await client.create_response()
        again = await read_response(client, Seen())
        assert again.response is not None and again.response.status == "completed"


async def kill_mid_response(
    stack: Stack, prompt: str, kill_after: int, states: list[StateChange]
) -> tuple[RealtimeClient, Seen, ServerEvent, bool]:
    """Ask for a response and SIGKILL the gateway serving it after `kill_after`
    events; returns the client, what it saw, the `response.done`, and whether
    the kill happened before the response ended."""
    async with client_for(stack, states) as client:
        killed = stack.services[gateway_serving(stack, client.url)]
        seen = Seen()
        sent = False

        def kill(event: ServerEvent) -> None:
            nonlocal sent
            if len(seen.events) == kill_after and event.type != "response.done":
                killed.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                sent = True

        try:
            await client.add_text(prompt)
            await client.create_response()
            done = await read_response(client, seen, kill)
        finally:
            killed.stop()
            stack.restart(killed.name)
    return client, seen, done, sent


async def test_a_killed_gateway_is_resumed_on_the_other(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    prompt = 'kill me [[sim {"tokens": 80, "token_delay_ms": 10}]]'
    expected = await uninterrupted(stack, prompt)
    kills = resumed = 0
    for trial in range(2):
        states: list[StateChange] = []
        kill_after = rng.randrange(5, 40)  # after response.created
        context = f"seed {seed}, trial {trial}, killed after {kill_after} events"
        client, seen, done, sent = await kill_mid_response(stack, prompt, kill_after, states)
        kills += sent
        assert done.response is not None
        assert done.response.status == "completed", context
        assert seen.text() == expected, context
        assert seen.repeats() == 0 and client.tracker.duplicates == 0, context
        assert client.resumes == 1, context
        # Resumed when the kill cut the stream (not when it was all read already).
        assert done.response.resumed == (client.tracker.losses == 1), context
        resumed += done.response.resumed
        assert ConnectionState.RESUMING in [s.state for s in states], context
    print(
        f"\npython sdk, killed gateway: seed {seed}, kills {kills}, resumed {resumed}, "
        "duplicates found 0"
    )
    assert kills == 2 and resumed >= 1


class CuttableLink:
    """A TCP relay to a gateway whose `cut()` stops all traffic both ways while
    keeping the sockets open: a network cut, where no FIN or RST ever arrives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/realtime"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()

    def cut(self) -> None:
        self.flowing.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                await self.flowing.wait()  # cut: hold the bytes, answer nothing
                sink.write(data)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_network_cut_is_found_by_the_heartbeat_and_resumed(stack: Stack) -> None:
    expected = await uninterrupted(stack, PROMPT)
    link = CuttableLink(stack.gateway_ports[0])
    states: list[StateChange] = []
    async with link as through_link:
        client = RealtimeClient(
            [through_link, gateway_urls(stack)[1]],
            api_key=stack.dev_key,
            backoff=Backoff(base_s=0.05, max_s=0.5),
            on_state=states.append,
            ping_interval_s=0.5,
            ping_timeout_s=1.0,
        )
        async with client:
            seen = Seen()

            def cut(event: ServerEvent) -> None:
                if event.type == "response.output_text.delta" and link.flowing.is_set():
                    link.cut()

            await client.add_text(PROMPT)
            await client.create_response()
            done = await read_response(client, seen, cut)
    assert done.response is not None and done.response.status == "completed"
    assert done.response.resumed and seen.text() == expected
    assert seen.repeats() == 0 and client.tracker.duplicates == 0
    resuming = [s for s in states if s.state is ConnectionState.RESUMING]
    assert resuming and resuming[0].close_code is None  # no close frame: found by the pings


async def test_a_draining_gateway_hands_the_client_to_the_other(stack: Stack) -> None:
    prompt = 'drain me [[sim {"tokens": 40, "token_delay_ms": 10}]]'
    expected = await uninterrupted(stack, prompt)
    states: list[StateChange] = []
    async with client_for(stack, states) as client:
        drained = stack.services[gateway_serving(stack, client.url)]
        try:
            seen = Seen()
            drain_after = random.randrange(5, 30)

            def drain(event: ServerEvent) -> None:
                nonlocal drain_after
                if event.type == "response.output_text.delta" and len(seen.events) >= drain_after:
                    drained.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                    drain_after = 1 << 30

            await client.add_text(prompt)
            await client.create_response()
            done = await read_response(client, seen, drain)
            assert done.response is not None and done.response.status == "completed"
            assert seen.text() == expected
            # Closed with 1012 after the response, the client resumes on the other.
            stream = client.stream_text("after the drain")
            async for _ in stream:
                pass
            assert stream.response.status == "completed"
            assert seen.repeats() == 0 and client.tracker.duplicates == 0
        finally:
            drained.stop()
            stack.restart(drained.name)
    resuming = [s for s in states if s.state is ConnectionState.RESUMING]
    assert resuming and resuming[0].close_code == 1012


async def test_events_sent_at_the_instant_of_a_cut_are_sent_again_once(stack: Stack) -> None:
    async with client_for(stack) as client:
        # Written to a socket that is cut at once: the server never gets them.
        item_id = await client.add_text("said at the cut")
        await client.create_response()
        client.drop_connection()
        seen = Seen()
        done = await read_response(client, seen)
        assert done.response is not None and done.response.status == "completed"
        added = [
            e
            for e in seen.events
            if e.type == "conversation.item.added" and e.data["item"]["id"] == item_id
        ]
        assert len(added) == 1
        assert [e.type for e in seen.events].count("response.created") == 1
        assert client.tracker.unanswered() == []


async def test_logs_never_hold_the_key(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with client_for(stack) as client:
        stream = client.stream_text("hello")
        async for _ in stream:
            client.drop_connection()
        assert stream.response.resumed
    assert "Authorization" in caplog.text  # websockets logged the handshake's headers
    assert stack.dev_key not in caplog.text


async def test_a_bad_key_is_not_retried(stack: Stack) -> None:
    states: list[StateChange] = []
    client = client_for(stack, states, api_key="sk-sb-not-a-key-of-anyone-000000")
    with pytest.raises(AuthenticationError) as refused:
        await client.connect()
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
    assert [s.state for s in states] == [ConnectionState.CONNECTING, ConnectionState.CLOSED]
    assert "not-a-key" not in str(refused.value)
    await client.close()


async def test_the_token_provider_refreshes_refused_and_expiring_secrets(stack: Stack) -> None:
    given: list[str] = []

    async def provider() -> ClientSecret:
        if not given:  # a secret the server does not know (expired, say)
            given.append("ek_" + "0" * 40)
            return ClientSecret(given[-1])
        value, _ = mint_secret(stack)
        given.append(value)
        # Expires within the refresh margin: the next connection asks again.
        return ClientSecret(value, expires_at=time.time() + 3)

    async with RealtimeClient(
        gateway_urls(stack), token_provider=provider, backoff=Backoff(base_s=0.05, max_s=0.2)
    ) as client:
        assert len(given) == 2  # refused, then a fresh one
        stream = client.stream_text(PROMPT)
        async for _ in stream:
            if len(stream.responses) == 0 and len(given) == 2:
                client.drop_connection()
                await asyncio.sleep(0)
        assert stream.response.status == "completed"
        assert len(given) == 3  # asked again before the expiring secret was reused
        assert stream.response.resumed


async def test_client_tools_are_plain_async_functions(stack: Stack) -> None:
    calls: list[dict[str, Any]] = []

    async def get_weather(city: str) -> dict[str, Any]:
        calls.append({"city": city})
        return {"city": city, "sky": "clear"}

    tool = Tool(
        "get_weather",
        get_weather,
        "The weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    async with client_for(stack, tools=[tool]) as client:
        call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
        prompt = f"weather? [[sim {json.dumps({'tool_calls': [call]})}]]"
        stream = client.stream_text(prompt)
        async for _ in stream:
            pass
        assert calls == [{"city": "Oslo"}]
        assert [r.status for r in stream.responses] == ["completed", "completed"]
        assert stream.responses[0].tool_calls[0].name == "get_weather"
        # The simulator's follow-up quotes the tool's output.
        assert 'returned {"city": "Oslo", "sky": "clear"}' in stream.response.text


async def test_a_client_tool_that_raises_is_answered_with_an_error(stack: Stack) -> None:
    async def explode() -> str:
        raise RuntimeError("no weather today")

    async with client_for(stack, tools=[Tool("explode", explode)]) as client:
        call = {"name": "explode", "arguments": {}}
        stream = client.stream_text(f"go [[sim {json.dumps({'tool_calls': [call]})}]]")
        async for _ in stream:
            pass
        assert [r.status for r in stream.responses] == ["completed", "completed"]
        assert '"code": "tool_failed"' in stream.response.text
        assert "no weather today" in stream.response.text
