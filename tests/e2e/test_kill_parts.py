"""Each part killed under load (SIGKILL: Redis, session, toolexec, broker, the
gateway), with the launcher's supervisor restarting it as `make run` does:
conversations stream all along, and every outcome is one docs/ promises.

- A response running when the broker or the session service dies ends `failed`
  (`service_unavailable`); the connection stays open (docs/protocol.md).
- A server-side tool call while toolexec is down is an `error` with the call's
  id as `param`, and the turn goes on (docs/protocol.md, Function calls).
- Redis restarts from its append-only file: no session is lost, connections stay
  open, later turns still see the first one; responses meanwhile end `completed`
  or `failed` with a store error.
- The gateway: every client reconnects with `session_id` and `last_event_id`,
  and each response it was in ends `completed` with exactly the text streamed
  across both connections, or `failed` with `response_interrupted`.
- Each part is restarted by the supervisor, and new conversations are served.

The figures (responses by status, errors by code, closes by code, resumes,
hangs) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from tools.stack import Ports, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

CONVERSATIONS = 6
# A response streams for about 30 x 15 ms, turn after turn: every conversation is
# mid-response most of the time, and starts several while a part is down. (The
# simulator's reply lists every earlier user message, so it grows each turn.)
SIMULATOR = ["--ttft-ms", "30", "--token-delay-ms", "15", "--reply-tokens", "30"]
CALL_A_TOOL = ' [[sim {"tool_calls": [{"name": "calculate", "arguments": {"expression": "6*7"}}]}]]'
PARTS = ("broker", "session", "toolexec", "redis", "gateway")
# Errors a response may end `failed` with while each part is down.
EXPECTED_FAILURES = {
    "broker": {"service_unavailable"},
    "session": {"service_unavailable"},
    "toolexec": set(),
    "redis": {"service_unavailable", "session_store_unavailable"},
    "gateway": {"response_interrupted"},
}
# Errors a client may be told (besides the failures) while each part is down.
EXPECTED_ERRORS = {
    "broker": set(),
    "session": {"service_unavailable"},
    "toolexec": {"service_unavailable"},
    "redis": {"service_unavailable", "session_store_unavailable"},
    "gateway": set(),
}


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[str]]]:
    reports: list[str] = []
    stack = Stack(
        ports=Ports.free(),
        simulator_args=SIMULATOR,
        redis_dir=tmp_path_factory.mktemp("redis"),
        extra_env={
            # A killed gateway's sessions can be resumed after 1 s (10 s by default).
            "SWITCHBOARD_GATEWAY_SESSION_LEASE_S": "1",
            "SWITCHBOARD_GATEWAY_RPC_TIMEOUT_S": "2",
        },
    )
    with stack:
        stack.supervise(reports.append)
        yield stack, reports


@dataclass
class Outcome:
    """What one conversation saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    resumes: int = 0
    hangs: int = 0
    # Responses whose response.done text differs from the deltas received.
    mismatches: int = 0
    completed_after: float = 0.0


class Conversation:
    """A client that talks turn after turn and resumes whenever its connection
    drops, as our SDKs do (docs/protocol.md, Resume)."""

    def __init__(self, stack: Stack, number: int) -> None:
        self.stack = stack
        self.number = number
        self.session_id = ""
        self.last_event_id = ""
        self.connection: Any = None
        self.outcome = Outcome()
        self.tools = False
        self.first_words = f"first words of conversation {number}"
        self.turns = 0
        self.remembered: list[bool] = []

    async def _connect(self) -> None:
        query = "model=gpt-realtime"
        if self.session_id:
            query += f"&session_id={self.session_id}&last_event_id={self.last_event_id}"
            self.outcome.resumes += 1
        delay = 0.2
        for _ in range(60):
            try:
                self.connection = await websockets.connect(
                    f"{self.stack.websocket_url}?{query}",
                    additional_headers={"Authorization": f"Bearer {self.stack.dev_key}"},
                    max_size=None,
                    open_timeout=10,
                )
                return
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError(f"conversation {self.number} could not reconnect")

    async def _recv(self) -> dict[str, Any]:
        """The next event, resuming across a dropped connection."""
        while True:
            if self.connection is None:
                await self._connect()
            try:
                event: dict[str, Any] = orjson.loads(await self.connection.recv())
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else 1006
                self.outcome.closes[code] += 1
                self.connection = None
                continue
            self.last_event_id = event["event_id"] or self.last_event_id
            if event["type"] == "session.created":
                self.session_id = event["session"]["id"]
            return event

    async def _send(self, event: dict[str, Any]) -> None:
        while True:
            if self.connection is None:
                await self._connect()
            try:
                await self.connection.send(orjson.dumps(event).decode())
                return
            except websockets.ConnectionClosed:
                self.connection = None

    async def turn(self) -> None:
        self.turns += 1
        text = f"turn {self.turns}" if self.turns > 1 else self.first_words
        if self.tools:
            text += CALL_A_TOOL
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        await self._send({"type": "response.create"})
        # A tool call is followed by the gateway's own follow-up response.
        responses = 2 if self.tools else 1
        deltas: dict[str, list[str]] = {}
        try:
            async with asyncio.timeout(60):
                while responses:
                    event = await self._recv()
                    if event["type"] == "response.output_text.delta":
                        deltas.setdefault(event["response_id"], []).append(event["delta"])
                    elif event["type"] == "error":
                        self.outcome.errors[event["error"]["code"]] += 1
                    elif event["type"] == "response.done":
                        responses -= 1
                        self._done(
                            event["response"], "".join(deltas.get(event["response"]["id"], []))
                        )
                        if event["response"]["status"] != "completed":
                            responses = 0  # no follow-up after a failed response
        except TimeoutError:
            self.outcome.hangs += 1
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = None

    def _done(self, response: dict[str, Any], streamed: str) -> None:
        status = response["status"]
        self.outcome.statuses[status] += 1
        if status == "failed":
            self.outcome.failures[response["status_details"]["error"]["code"]] += 1
        text = "".join(
            part.get("text", "")
            for item in response["output"]
            if item["type"] == "message"
            for part in item["content"]
        )
        if status == "completed" and text:
            if text != streamed:
                self.outcome.mismatches += 1
            if self.turns > 1:
                self.remembered.append(self.first_words in text)
            self.outcome.completed_after = asyncio.get_running_loop().time()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class Load:
    def __init__(self, stack: Stack, conversations: int) -> None:
        self.conversations = [Conversation(stack, n) for n in range(conversations)]
        self.tasks: list[asyncio.Task[None]] = []
        self.running = True

    async def _talk(self, conversation: Conversation) -> None:
        while self.running:
            failed = conversation.outcome.statuses["failed"]
            await conversation.turn()
            if conversation.outcome.statuses["failed"] > failed:
                await asyncio.sleep(0.5)  # as a client would, before it asks again

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._talk(c)) for c in self.conversations]

    def snapshot(self) -> list[Outcome]:
        snap = []
        for c in self.conversations:
            o = c.outcome
            snap.append(
                Outcome(
                    Counter(o.statuses),
                    Counter(o.failures),
                    Counter(o.errors),
                    Counter(o.closes),
                    o.resumes,
                    o.hangs,
                    o.mismatches,
                    o.completed_after,
                )
            )
        return snap

    async def all_completed_since(self, since: float, timeout_s: float = 90) -> None:
        """Until every conversation has completed a response after `since`."""
        async with asyncio.timeout(timeout_s):
            while any(c.outcome.completed_after <= since for c in self.conversations):
                for task in self.tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.running = False
        await asyncio.wait_for(asyncio.gather(*self.tasks), 90)
        for c in self.conversations:
            await c.close()


def delta(before: list[Outcome], after: list[Outcome]) -> Outcome:
    total = Outcome()
    for old, new in zip(before, after, strict=True):
        total.statuses += new.statuses - old.statuses
        total.failures += new.failures - old.failures
        total.errors += new.errors - old.errors
        total.closes += new.closes - old.closes
        total.resumes += new.resumes - old.resumes
        total.hangs += new.hangs - old.hangs
        total.mismatches += new.mismatches - old.mismatches
    return total


def kill(stack: Stack, part: str) -> None:
    if part == "redis":
        assert stack.redis is not None and stack.redis.pid is not None
        os.kill(stack.redis.pid, signal.SIGKILL)
        return
    process = stack.services[part].process
    assert process is not None
    process.send_signal(signal.SIGKILL)


async def ready(stack: Stack, timeout_s: float = 60) -> None:
    """Until the gateway (restarted, perhaps not listening yet) is ready."""
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{stack.gateway_url}/readyz") as reply:
                    if reply.status == 200:
                        return
            await asyncio.sleep(0.2)


def tracebacks(log_dir: Path) -> dict[str, int]:
    return {
        path.name: path.read_text(errors="replace").count("Traceback")
        for path in sorted(log_dir.glob("*.log"))
    }


async def test_each_part_killed_under_load(supervised: tuple[Stack, list[str]]) -> None:
    stack, reports = supervised
    loop = asyncio.get_running_loop()
    load = Load(stack, CONVERSATIONS)
    load.start()
    await load.all_completed_since(0)
    figures: dict[str, Outcome] = {}
    for part in PARTS:
        for conversation in load.conversations:
            conversation.tools = part == "toolexec"
        # Every conversation streams when the part dies.
        await load.all_completed_since(loop.time())
        await asyncio.sleep(0.5)
        before = load.snapshot()
        killed_at = loop.time()
        kill(stack, part)
        # The supervisor notices, waits its backoff and starts it again.
        async with asyncio.timeout(60):
            while f"{part} restarted" not in reports:
                await asyncio.sleep(0.1)
        await ready(stack)
        # Then every conversation is served again.
        await load.all_completed_since(loop.time())
        outcome = figures[part] = delta(before, load.snapshot())
        print(f"\n{part} killed: {outcome} ({loop.time() - killed_at:.1f} s)")

        assert outcome.hangs == 0, part
        assert outcome.mismatches == 0, part
        assert set(outcome.failures) <= EXPECTED_FAILURES[part], (part, outcome.failures)
        assert set(outcome.errors) <= EXPECTED_FAILURES[part] | EXPECTED_ERRORS[part], (
            part,
            outcome.errors,
        )
        if part == "gateway":
            # Every client lost its connection and resumed.
            assert set(outcome.closes) == {1006}, outcome.closes
            assert outcome.resumes >= CONVERSATIONS
        else:
            assert not outcome.closes, (part, outcome.closes)
        if part in ("broker", "session"):
            # Every conversation was streaming: each had a response that failed.
            assert outcome.statuses["failed"] >= 1, (part, outcome)
        if part == "toolexec":
            assert outcome.errors["service_unavailable"] >= 1, outcome
    await load.stop()
    # Nothing promised was lost: after all of it, every conversation's latest
    # reply still names its first words (the items survived Redis's restart).
    for conversation in load.conversations:
        assert conversation.remembered and conversation.remembered[-1], conversation.number
    # A new conversation is served.
    fresh = Conversation(stack, 99)
    await fresh.turn()
    assert fresh.outcome.statuses == Counter(completed=1)
    await fresh.close()
    supervisor = stack.supervisor
    assert supervisor is not None
    assert supervisor.restarts == dict.fromkeys(PARTS, 1)
    print("\nsupervisor:", *reports, sep="\n  ")
    found = tracebacks(stack.log_dir)
    print("tracebacks in logs:", found)
    assert not any(found.values()), found
