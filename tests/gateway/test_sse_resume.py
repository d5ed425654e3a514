"""Resumable SSE streams in-process: `Last-Event-ID` gets exactly the frames after
it, rebuilt from the session's log, after the stream ended and while it runs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from switchboard.gateway.testing import reply
from switchboard.gateway.testing.model import Script, Text, Wait
from tests.gateway.test_app import KEY, Gateway
from tests.gateway.test_chat_completions import MESSAGES, Raw, post

CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
RESPONSES = {"model": "gpt-4o-mini", "input": "Hi", "stream": True}


def text_of(events: list[dict[str, str]]) -> str:
    text = []
    for event in events:
        if event["data"] == "[DONE]":
            continue
        data = orjson.loads(event["data"])
        if data.get("choices"):
            text.append(data["choices"][0]["delta"].get("content") or "")
        elif data.get("type") == "response.output_text.delta":
            text.append(data["delta"])
    return "".join(text)


async def test_a_resume_after_the_end_gets_exactly_the_rest(gateway: Gateway) -> None:
    gateway.backends.model.queue(reply("one", " two", " three", " four"))
    whole = (await post(gateway, CHAT)).events()
    for cut in (0, 2, len(whole) - 2):
        resumed = await post(gateway, CHAT, headers={"Last-Event-ID": whole[cut]["id"]})
        assert resumed.status == 200
        assert resumed.events() == whole[cut + 1 :]
    # The model was called once: a resume replays, it does not ask again.
    assert len(gateway.backends.model.requests) == 1


async def test_a_responses_stream_resumes_with_its_sequence_numbers(gateway: Gateway) -> None:
    gateway.backends.model.queue(reply("a", "b", "c"))
    whole = (await post(gateway, RESPONSES, "/v1/responses")).events()
    resumed = await post(
        gateway, RESPONSES, "/v1/responses", headers={"Last-Event-ID": whole[4]["id"]}
    )
    assert resumed.events() == whole[5:]
    numbers = [orjson.loads(e["data"])["sequence_number"] for e in whole]
    assert numbers == list(range(len(whole)))


async def test_a_running_stream_resumes_where_the_client_left(gateway: Gateway) -> None:
    """A resumable stream's client leaves mid-response; the turn runs on; a resume
    gets the rest, and the text equals what one stream would have carried."""
    release = asyncio.Event()
    gateway.backends.model.queue(Script([Text("before "), Wait(release), Text("after")]))
    headers = {"Authorization": f"Bearer {KEY}", "Switchboard-Resumable": "true"}
    url = f"http://{gateway.url}/v1/chat/completions"
    seen: list[dict[str, str]] = []
    async with aiohttp.ClientSession() as http, http.post(url, json=CHAT, headers=headers) as cut:
        async for raw in cut.content:
            line = raw.decode().strip()
            if line.startswith("id: "):
                seen.append({"id": line[4:]})
            elif line.startswith("data: "):
                seen[-1]["data"] = line[6:]
                if "before" in line:
                    break
    # The client is gone; the model call was not cancelled.
    await asyncio.sleep(0.05)
    assert gateway.backends.model.cancelled == []
    resume = asyncio.create_task(post(gateway, CHAT, headers={"Last-Event-ID": seen[-1]["id"]}))
    await asyncio.sleep(0.05)
    release.set()
    rest = (await resume).events()
    assert text_of(seen) + text_of(rest) == "before after"
    assert rest[-1]["data"] == "[DONE]"
    ids = [event["id"] for event in seen + rest]
    assert len(set(ids)) == len(ids)


async def refused(gateway: Gateway, last_event_id: str, path: str = "/v1/chat/completions") -> Raw:
    body: dict[str, Any] = CHAT if "chat" in path else RESPONSES
    return await post(gateway, body, path, headers={"Last-Event-ID": last_event_id})


async def test_bad_last_event_ids_are_refused(gateway: Gateway) -> None:
    answer = await refused(gateway, "nonsense")
    assert (answer.status, answer.json()["error"]["code"]) == (400, "invalid_value")
    answer = await refused(gateway, "sess_doesnotexist.3.0")
    assert (answer.status, answer.json()["error"]["code"]) == (404, "session_not_found")
    gateway.backends.model.queue(reply("x"))
    chat_id = (await post(gateway, CHAT)).events()[1]["id"]
    answer = await refused(gateway, chat_id, "/v1/responses")
    assert (answer.status, answer.json()["error"]["param"]) == (400, "Last-Event-ID")
    session, _, _ = chat_id.partition(".")
    answer = await refused(gateway, f"{session}.999.0")
    assert (answer.status, answer.json()["error"]["code"]) == (410, "resume_unavailable")


async def test_a_drain_lets_streams_finish_and_refuses_new_ones(gateway: Gateway) -> None:
    release = asyncio.Event()
    gateway.backends.model.queue(Script([Text("a"), Wait(release), Text("b")]))
    running = asyncio.create_task(post(gateway, CHAT))
    while not gateway.backends.model.requests:
        await asyncio.sleep(0.01)
    drainer = gateway.app.state.drainer
    drain = asyncio.create_task(drainer.drain(30))
    await asyncio.sleep(0.05)
    refused = await post(gateway, CHAT)
    assert (refused.status, refused.json()["error"]["code"]) == (503, "server_busy")
    assert refused.headers["retry-after"] == "1"
    release.set()
    assert text_of((await running).events()) == "ab"
    await asyncio.wait_for(drain, 10)


async def test_past_the_drain_deadline_a_stream_ends_interrupted(gateway: Gateway) -> None:
    gateway.backends.model.queue(Script([Text("a"), Wait(asyncio.Event()), Text("b")]))
    running = asyncio.create_task(post(gateway, CHAT))
    while not gateway.backends.model.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(gateway.app.state.drainer.drain(0.1), 10)
    events = (await running).events()
    assert text_of(events) == "a"
    assert orjson.loads(events[-1]["data"])["error"]["code"] == "response_interrupted"
