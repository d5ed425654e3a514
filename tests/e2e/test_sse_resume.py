"""Resumable SSE streams across gateway replicas, through the real processes: a raw
SSE client (as a browser's EventSource is) cut mid-stream reconnects with
`Last-Event-ID` on the other gateway and gets exactly the rest; also when the
gateway it was on is killed (the other takes the turn up and re-attaches to the
model call at the broker)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tools.stack import Ports, Stack

SLOW = '[[sim {"tokens": 60, "token_delay_ms": 20}]]'


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(
        ports=Ports.free(),
        replicas=2,
        extra_env={"SWITCHBOARD_GATEWAY_SESSION_LEASE_S": "1"},
    ) as stack:
        yield stack


def chat(text: str) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"{text} {SLOW}"}],
        "stream": True,
    }


def headers(stack: Stack, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.dev_key}", **more}


async def read_events(
    response: aiohttp.ClientResponse, stop_after_deltas: int | None = None
) -> list[dict[str, str]]:
    """The SSE events of a response, stopping after that many text deltas."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    deltas = 0
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        events.append(fields)
        fields = {}
        deltas += '"content":"' in events[-1]["data"] and '"role"' not in events[-1]["data"]
        if stop_after_deltas is not None and deltas >= stop_after_deltas:
            break
    return events


def text_of(events: list[dict[str, str]]) -> str:
    text = []
    for event in events:
        if event["data"] != "[DONE]":
            choices = orjson.loads(event["data"]).get("choices") or [{"delta": {}}]
            text.append(choices[0]["delta"].get("content") or "")
    return "".join(text)


async def uninterrupted(stack: Stack, http: aiohttp.ClientSession, text: str) -> str:
    url = f"{stack.gateway_url}/v1/chat/completions"
    async with http.post(url, json=chat(text), headers=headers(stack)) as response:
        return text_of(await read_events(response))


async def cut_and_resume(stack: Stack, text: str, *, kill_first: bool) -> None:
    first, second = stack.gateway_ports
    async with aiohttp.ClientSession() as http:
        expected = await uninterrupted(stack, http, text)
        url = f"http://127.0.0.1:{first}/v1/chat/completions"
        resumable = headers(stack, **{"Switchboard-Resumable": "true"})
        async with http.post(url, json=chat(text), headers=resumable) as response:
            seen = await read_events(response, stop_after_deltas=5)
            if kill_first:
                os.kill(stack.services["gateway"].pid, signal.SIGKILL)
            response.connection.transport.abort()  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{second}/v1/chat/completions"
        last = headers(stack, **{"Last-Event-ID": seen[-1]["id"]})
        async with http.post(url, json=chat(text), headers=last) as response:
            assert response.status == 200
            rest = await read_events(response)
    assert rest[-1]["data"] == "[DONE]"
    ids = [event["id"] for event in seen + rest]
    assert len(set(ids)) == len(ids), "an event was repeated"
    assert text_of(seen) + text_of(rest) == expected


async def test_a_cut_stream_resumes_on_the_other_gateway(stack: Stack) -> None:
    await cut_and_resume(stack, "resume me", kill_first=False)


async def test_a_stream_resumes_when_its_gateway_was_killed(stack: Stack) -> None:
    try:
        await cut_and_resume(stack, "kill its gateway", kill_first=True)
    finally:
        stack.restart("gateway")
