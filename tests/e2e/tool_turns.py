"""Helpers for the voice tests' tool turns: directives that make the simulator's
Realtime endpoint call tools, event filters, and what the upstream saw."""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson

from tests.e2e.conftest import RealtimeClient
from tools.stack import Stack


def calls(*specs: tuple[str, dict[str, Any]]) -> str:
    """A directive: the reply calls these tools (name, arguments)."""
    keys = {"tool_calls": [{"name": name, "arguments": args} for name, args in specs]}
    return f"[[sim {orjson.dumps(keys).decode()}]]"


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["type"] == kind]


async def until_done(client: RealtimeClient, responses: int) -> list[dict[str, Any]]:
    """The events up to the `response.done` of `responses` responses."""
    events: list[dict[str, Any]] = []
    for _ in range(responses):
        events += await client.recv_until("response.done", timeout_s=30)
    return events


def last_session(stack: Stack) -> dict[str, Any]:
    """The newest session in the simulator's log (what the upstream saw)."""
    with urllib.request.urlopen(f"{stack.simulator_url}/_sim/realtime", timeout=5) as answer:
        session: dict[str, Any] = orjson.loads(answer.read())["sessions"][-1]
        return session
