"""A voice model from a tenants file (`kind: realtime`), and the tenant's token
budget counted with the upstream's usage, audio tokens included."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import websockets

from switchboard.tenancy import hash_key
from tests.e2e.conftest import RealtimeClient, assert_no_secret_leaks
from tools.stack import Ports, Stack

KEY = "sk-sb-voice-limits-tenant-key-0001"
TENANTS = """
upstreams:
  default:
    base_url: http://127.0.0.1:{simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
  realtime:
    kind: realtime
    base_url: http://127.0.0.1:{simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
tenants:
  talk:
    keys: ["{key}"]
    models:
      voice: {{upstream: realtime, upstream_model: gpt-realtime}}
      text: {{upstream: default, upstream_model: sim-small}}
    limits: {{max_output_tokens: 50}}
    daily_token_budget: 200
    session: {{model: voice, instructions: "Long answers. [[sim {{\\"audio_ms\\": 6000}}]]"}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(TENANTS.format(simulator=ports.simulator, key=hash_key(KEY)))
    stack = Stack(ports=ports, extra_env={"SWITCHBOARD_TENANTS_FILE": str(tenants)})
    with stack:
        yield stack
    assert_no_secret_leaks(stack)


async def test_audio_tokens_spend_the_budget_and_a_refused_response_plays_nothing(
    stack: Stack,
) -> None:
    url = f"{stack.websocket_url}?model=voice"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as socket:
        client = RealtimeClient(socket)
        created = await client.recv()
        assert created["session"]["instructions"].startswith("Long answers.")
        await client.say("hi")
        first = await client.respond()
        usage = first[-1]["response"]["usage"]
        # 6 s of reply audio is 120 output audio tokens: alone past what is left
        # of the 200-token budget once the next response reserves its 50.
        assert usage["output_token_details"]["audio_tokens"] == 120
        assert first[-1]["response"]["status"] == "completed"
        await client.say("again")
        await client.send({"type": "response.create"})
        second = await client.recv_until("response.done")
        kinds = [event["type"] for event in second]
        assert kinds[0] == "response.created"
        error = second[kinds.index("error")]["error"]
        assert error["code"] == "insufficient_quota"
        assert "response.output_audio.delta" not in kinds
        assert second[-1]["response"]["status"] == "cancelled"
        # The text model of the same tenant is not a voice model.
        await client.send({"type": "session.update", "session": {"model": "text"}})
        refused = (await client.recv_until("error"))[-1]["error"]
        assert refused["param"] == "session.model"
    text = orjson.dumps(second).decode()
    assert "api_key" not in text
