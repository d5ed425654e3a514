"""A client that stops reading: its deltas are merged, then it is cut with 4008
`slow_consumer`; a client that reads on the same gateway is never held up, and
the gateway's memory stays flat."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from switchboard import rpc
from switchboard.v1 import session_pb2, session_pb2_grpc
from tests.e2e.conftest import RealtimeClient, reply_text
from tools.stack import DEV_TENANT, Ports, Stack

# How long a cut client's response runs on, recorded for a resume.
GRACE_S = 4


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A stack whose gateway caps each client socket's kernel send buffer, so a
    client that stops reading is felt in the outbox after ~128 KiB, not ~4 MiB;
    a cut client's response runs on (recorded for a resume) for 4 s. A client
    that reads nothing answers no ping either: the heartbeat waits a minute, so
    that what ends it here is the slow-consumer cut (test_lifetime.py tests the
    heartbeat)."""
    stack = Stack(
        ports=Ports.free(),
        extra_env={
            "SWITCHBOARD_GATEWAY_SEND_BUFFER_BYTES": "65536",
            "SWITCHBOARD_GATEWAY_DISCONNECT_GRACE_S": str(GRACE_S),
            "SWITCHBOARD_GATEWAY_PING_TIMEOUT_S": "60",
        },
    )
    with stack:
        yield stack


# Directive prefix: no delays, the reply length follows.
FAST = '[[sim {"ttft_ms": 5, "token_delay_ms": 0, "tokens":'


async def connect_lagging(stack: Stack) -> Any:
    return await connect_lagging_to(stack, "gpt-realtime")


async def connect_lagging_to(stack: Stack, model: str) -> Any:
    """A client whose socket holds little, so the gateway feels it not reading.

    It sends no keepalive pings of its own: a client that reads nothing never sees
    their pongs, and would close itself (1011) after ping interval plus timeout,
    before the gateway's cut on a slow machine."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.ports.gateway))
    sock.setblocking(False)
    return await websockets.connect(
        f"{stack.websocket_url}?model={model}",
        additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
        sock=sock,
        max_queue=1,
        max_size=None,
        ping_interval=None,
    )


@pytest.fixture
async def sim(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stack.simulator_url) as session:
        yield session


async def stream_outcome(sim: aiohttp.ClientSession, marker: str) -> str:
    async with sim.get("/_sim/streams") as reply:
        streams = (await reply.json())["streams"]
    return str(next(s for s in reversed(streams) if marker in s["last_user"])["outcome"])


async def ask(client: RealtimeClient, text: str) -> None:
    await client.say(text)
    await client.send({"type": "response.create"})


async def test_a_slow_reader_gets_every_word_in_fewer_events(
    stack: Stack, sim: aiohttp.ClientSession
) -> None:
    # A reply whose text (~140 KB, and ~5 x that in the closing events that carry
    # the whole text) fits the default 1 MiB outbox once merged, but whose 20,000
    # delta events (~190 bytes each, ~3.8 MB) do not fit the socket buffers of a
    # client that does not read.
    prompt = f"slow reader {FAST} 20000}}]]"
    # What the reply is when read promptly (the simulator's reply is a function of
    # the conversation, so a new session with the same question gets the same text).
    async with websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
    ) as connection:
        prompt_reader = RealtimeClient(connection)
        await prompt_reader.recv()
        await prompt_reader.say(prompt)
        expected = reply_text(await prompt_reader.respond())
    assert len(expected.split()) == 20000

    connection = await connect_lagging(stack)
    client = RealtimeClient(connection)
    await client.recv()
    await ask(client, prompt)
    # Read one event every 2 ms: a tenth or less of the rate the stream arrives at.
    events = []
    while not events or events[-1]["type"] != "response.done":
        events.append(await client.recv(timeout_s=60))
        await asyncio.sleep(0.002)
    await connection.close()
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert reply_text(events) == expected
    assert events[-1]["response"]["status"] == "completed"
    assert len(deltas) < 20000 / 2  # merged while the client lagged
    assert [e["type"] for e in events].count("response.output_text.done") == 1


# How much the gateway's resident memory may grow while it streams a reply of
# hundreds of thousands of tokens to a client that reads none of them.
FLAT_MIB = 32


async def test_a_reader_that_falls_too_far_behind_is_cut_and_others_go_on(
    stack: Stack, sim: aiohttp.ClientSession
) -> None:
    """...while the gateway's memory stays flat: what waits for the client is
    bounded (merged, then cut), so taking in the stream costs no more memory
    however long it runs. (Ending the response is another matter: its closing
    events carry the whole text, a few times over.)"""
    gateway = stack.services["gateway"].process
    assert gateway is not None
    stalled = RealtimeClient(await connect_lagging(stack))
    samples: list[tuple[float, float]] = []  # (time, RSS)
    sent: list[tuple[float, int]] = []  # (time, tokens the simulator had sent)
    try:
        session_id = (await stalled.recv())["session"]["id"]
        base = rss_mib(gateway.pid)

        async def sample() -> None:
            while True:
                for _ in range(10):
                    samples.append((time.time(), rss_mib(gateway.pid)))
                    await asyncio.sleep(0.02)
                sent.append((time.time(), await tokens_sent(sim, "never reads")))

        sampler = asyncio.create_task(sample())
        # Far longer than the cut plus the grace: its end is the gateway's doing.
        await ask(stalled, f"never reads {FAST} 1000000}}]]")
        try:
            delta_bytes = await fast_client_goes_on_then_the_stalled_one_is_cut(stack, sim, stalled)
        finally:
            sampler.cancel()
    finally:
        await stalled.connection.close()
    # The gateway ends the response (and builds its closing events, the whole text
    # a few times over) when the disconnect grace after the cut has run out, not
    # before: until then it only takes in the stream. (How long it then takes the
    # upstream to see the close is no bound: seconds, on a busy machine.)
    closing = cut_at(stack, session_id) + GRACE_S
    streaming = [rss for at, rss in samples if at < closing]
    peak = max(streaming)
    unread = max(tokens for at, tokens in sent if at < closing)
    unread_mib = unread * delta_bytes / (1 << 20)
    print(
        f"gateway RSS {base:.1f} MiB before, {peak:.1f} MiB at most while it was sent "
        f"{unread} tokens ({unread_mib:.0f} MiB as the delta events the client never "
        f"read; {len(streaming)} samples, up to the grace's end)"
    )
    # The stream was long enough that holding its events would break the bound,
    # had each token its delta event (the broker sends them in batches, so the
    # gateway builds far fewer: a copy of the text per batch breaks it)...
    assert unread_mib > FLAT_MIB
    # ...and the gateway did not hold them.
    assert peak - base < FLAT_MIB
    # Yet it recorded the response to its end for a resume, closing events (with
    # the whole text, megabytes of it) included.
    ended = await last_response_done(stack, session_id)
    assert ended["status"] == "cancelled"
    assert ended["status_details"]["reason"] == "client_disconnected"
    assert len(ended["output"][0]["content"][0]["text"]) > 1 << 20


async def tokens_sent(sim: aiohttp.ClientSession, marker: str) -> int:
    """How many tokens the simulator has sent so far on the last stream asked with
    `marker` (0 before it starts)."""
    async with sim.get("/_sim/streams") as reply:
        streams = (await reply.json())["streams"]
    mine = [s for s in streams if marker in s["last_user"]]
    return int(mine[-1]["tokens_sent"]) if mine else 0


def cut_at(stack: Stack, session_id: str) -> float:
    """When the gateway cut the session's client as a slow consumer (its log line's
    time, Unix seconds)."""
    for raw in stack.services["gateway"].log_path.read_bytes().splitlines():
        if raw.startswith(b"{"):
            line = orjson.loads(raw)
            if line["msg"] == "slow consumer" and line.get("session_id") == session_id:
                return datetime.fromisoformat(line["ts"]).timestamp()
    raise AssertionError(f"the gateway logged no cut of {session_id}")


async def last_response_done(stack: Stack, session_id: str) -> dict[str, Any]:
    """The session's last recorded `response.done`, read from the session service.

    A cut client's response is ended and recorded by the detached sender after
    the close (its closing events hold the whole text, megabytes): it is waited
    for, up to 15 s."""
    async with rpc.channel(f"127.0.0.1:{stack.ports.session}") as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        ids = {"tenant_id": DEV_TENANT, "session_id": session_id}
        deadline = time.monotonic() + 15.0
        while True:
            session = await sessions.GetSession(session_pb2.GetSessionRequest(**ids))
            if session.open_response_id == "" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert session.open_response_id == ""  # ended, as recorded
        page = await sessions.ReadEvents(
            session_pb2.ReadEventsRequest(**ids, after_seq=session.last_event_seq - 5)
        )
    events = [orjson.loads(event.payload) for event in page.events]
    response: dict[str, Any] = [e for e in events if e["type"] == "response.done"][-1]["response"]
    return response


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def fast_client_goes_on_then_the_stalled_one_is_cut(
    stack: Stack, sim: aiohttp.ClientSession, stalled: RealtimeClient
) -> int:
    """Returns the size of one text delta event as sent (JSON bytes)."""
    async with websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {stack.dev_key}"},
    ) as connection:
        reader = RealtimeClient(connection)
        await reader.recv()
        # The fast client asks once the stalled one's stream runs (it is then
        # filling the stalled client's outbox, cut, and recorded on through the
        # grace; whether the fast reply ends before all that does is a matter of
        # the machine's speed, not asserted) and is served in full.
        for _ in range(1200):
            if await tokens_sent(sim, "never reads") > 0:
                break
            await asyncio.sleep(0.05)
        assert await tokens_sent(sim, "never reads") > 0
        await reader.say("a quick question")
        events = await reader.respond()
        done = events[-1]
        assert done["response"]["status"] == "completed"
        delta = next(e for e in events if e["type"] == "response.output_text.delta")
        delta_bytes = len(orjson.dumps({**delta, "delta": "word "}))

    # The stalled client is cut once 1 MiB waits for it; its response runs on,
    # recorded, for the 4 s disconnect grace, and then the gateway stops the
    # upstream stream. Wait for that without reading (reading would make it a
    # fast client), then read what the socket holds and the close frame.
    for _ in range(1200):
        if await stream_outcome(sim, "never reads") != "in_progress":
            break
        await asyncio.sleep(0.05)
    assert await stream_outcome(sim, "never reads") == "client_closed"

    async def read_to_the_end() -> None:
        while True:
            orjson.loads(await asyncio.wait_for(stalled.connection.recv(), 60))

    with pytest.raises(websockets.ConnectionClosed) as closed:
        await read_to_the_end()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert closed.value.rcvd.reason == "slow_consumer"
    return delta_bytes


async def test_a_voice_client_that_falls_behind_is_cut_and_its_upstream_closed(
    stack: Stack, sim: aiohttp.ClientSession
) -> None:
    # Ten minutes of reply audio, sent by the simulator at ~640 KB/s: audio deltas
    # are never merged, so a client that stops reading fills the 1 MiB outbox.
    connection = await connect_lagging_to(stack, "gpt-realtime-voice")
    client = RealtimeClient(connection)
    await client.recv()
    audio = '[[sim {"audio_ms": 600000, "ttfa_ms": 0}]]'
    await client.send({"type": "session.update", "session": {"instructions": audio}})
    await client.recv_until("session.updated")
    await ask(client, "talk for ten minutes")
    # Read nothing more: the gateway cuts the client, then the upstream socket.
    async with asyncio.timeout(60):
        while True:
            async with sim.get("/_sim/realtime") as reply:
                record = (await reply.json())["sessions"][-1]
            if record["ended_at"] is not None:
                break
            await asyncio.sleep(0.1)
    assert record["responses"][-1]["outcome"] == "client_closed"
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await asyncio.wait_for(_read_all(connection), 30)
    assert connection.close_code == 4008
    assert connection.close_reason == "slow_consumer"


async def _read_all(connection: Any) -> None:
    async for _ in connection:
        pass
