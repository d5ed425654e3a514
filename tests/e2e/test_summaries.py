"""Summarised context end to end: a fact from turn 1 is still in the context sent on
turn 50, within the budget, when the tenant summarises; without summaries it is gone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from switchboard.tenancy import hash_key
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tools.stack import Ports, Stack

SUMMARY_KEY = "sk-sb-summaries-on-key-000001"
DROP_KEY = "sk-sb-summaries-off-key-00001"
BUDGET = 300
FACT = "FACT: the code word is pelican."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = f"""  summarising:
    keys: ["{hash_key(SUMMARY_KEY)}"]
    models:
      gpt-realtime: {{}}
      cheap: {{}}
    summaries: {{enabled: true, model: cheap, context_tokens: {BUDGET}, summary_tokens: 80}}
  dropping:
    keys: ["{hash_key(DROP_KEY)}"]
    models:
      gpt-realtime: {{}}
    summaries: {{enabled: false, context_tokens: {BUDGET}}}
"""
    path = tenants_file(Path(tmp_path_factory.mktemp("summaries")), ports, tenants)
    stack = Stack(
        ports=ports,
        simulator_args=["--ttft-ms", "0", "--token-delay-ms", "0", "--reply-tokens", "12"],
        extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
    )
    with stack:
        yield stack


async def fifty_turns(stack: Stack, key: str) -> tuple[str, int]:
    """The answer of turn 50 (which echoes the facts in its context) and its input tokens."""
    async with websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {key}"},
    ) as connection:
        client = RealtimeClient(connection)
        assert (await client.recv())["type"] == "session.created"
        for turn in range(1, 51):
            text = f"turn {turn}: the weather is mild and the tea is warm today."
            if turn == 1:
                text = f"Hello. {FACT} Remember it."
            if turn == 50:
                text = 'What is the code word? [[sim {"echo_facts": true}]]'
            await client.say(text)
            events = await client.respond()
            done = events[-1]["response"]
            assert done["status"] == "completed", done
        return reply_text(events), done["usage"]["input_tokens"]


async def test_a_fact_from_turn_1_is_in_the_context_of_turn_50(stack: Stack) -> None:
    answer, input_tokens = await fifty_turns(stack, SUMMARY_KEY)
    assert f"facts=[{FACT}]" in answer
    assert input_tokens <= BUDGET


async def test_without_summaries_the_fact_is_dropped(stack: Stack) -> None:
    answer, input_tokens = await fifty_turns(stack, DROP_KEY)
    assert "facts=[]" in answer
    assert input_tokens <= BUDGET
