"""Cost in money of voice responses through the real processes: a seeded run of
spoken and typed turns, with audio and text replies, on a model with audio prices
and one without; the recorded cost equals the upstream's reported usage times the
prices (audio tokens at the audio prices, or the text ones when none are listed),
to the micro-dollar (`GET /v1/usage` and the metric)."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import websockets

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, assert_no_secret_leaks, realtime_upstream
from tests.voice_support import silence
from tools.stack import Ports, Stack

KEY = new_key()
# Micro-dollars per million tokens (what the ledger keeps): OpenAI's gpt-realtime.
TEXT = {"input": 4_000_000, "cached_input": 400_000, "output": 16_000_000}
AUDIO = {"input": 32_000_000, "cached_input": 400_000, "output": 64_000_000}
TENANTS = """
upstreams:{upstream}
tenants:
  payer:
    keys: ["{key}"]
    models:
      voice: {{upstream: realtime, upstream_model: gpt-realtime}}
      plain: {{upstream: realtime, upstream_model: gpt-realtime-mini}}
prices:
  gpt-realtime: {{input: 4.00, cached_input: 0.40, output: 16.00,
                 audio_input: 32.00, cached_audio_input: 0.40, audio_output: 64.00}}
  gpt-realtime-mini: {{input: 4.00, cached_input: 0.40, output: 16.00}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(
        TENANTS.format(upstream=realtime_upstream(ports.simulator), key=hash_key(KEY))
    )
    with Stack(ports=ports, extra_env={"SWITCHBOARD_TENANTS_FILE": str(tenants)}) as stack:
        yield stack
    assert_no_secret_leaks(stack)


def picodollars(usage: dict[str, Any], audio_prices: bool) -> int:
    """What `usage` costs: text and audio tokens apart, cached and not."""
    details_in, details_out = usage["input_token_details"], usage["output_token_details"]
    cached = details_in["cached_tokens_details"]
    audio = AUDIO if audio_prices else TEXT
    return (
        (details_in["text_tokens"] - cached["text_tokens"]) * TEXT["input"]
        + cached["text_tokens"] * TEXT["cached_input"]
        + (details_in["audio_tokens"] - cached["audio_tokens"]) * audio["input"]
        + cached["audio_tokens"] * audio["cached_input"]
        + details_out["text_tokens"] * TEXT["output"]
        + details_out["audio_tokens"] * audio["output"]
    )


async def session(stack: Stack, model: str, turns: list[tuple[bool, int, str]]) -> list[Any]:
    """One voice session of `turns` (spoken?, ms of speech or words, reply modality);
    the usage of each response."""
    url = f"{stack.websocket_url}?model={model}"
    headers = {"Authorization": f"Bearer {KEY}"}
    usages = []
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as socket:
        client = RealtimeClient(socket)
        await client.recv()
        vad_off = {"input": {"turn_detection": None}}
        await client.send({"type": "session.update", "session": {"audio": vad_off}})
        await client.recv_until("session.updated")
        for spoken, size, modality in turns:
            if spoken:
                audio = base64.b64encode(silence(size)).decode()
                await client.send({"type": "input_audio_buffer.append", "audio": audio})
                await client.send({"type": "input_audio_buffer.commit"})
                await client.recv_until("conversation.item.done")
            else:
                await client.say("word " * size)
            await client.send(
                {"type": "response.create", "response": {"output_modalities": [modality]}}
            )
            done = (await client.recv_until("response.done", timeout_s=30))[-1]["response"]
            assert done["status"] == "completed"
            usages.append(done["usage"])
    return usages


async def test_voice_cost_is_usage_times_audio_and_text_prices(stack: Stack) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    expected = 0
    usages = []
    for model in ("voice", "plain"):
        turns = [
            (
                spoken := rng.random() < 0.6,
                rng.randrange(200, 1200) if spoken else rng.randrange(1, 30),
                rng.choice(("audio", "text")),
            )
            for _ in range(6)
        ]
        for usage in await session(stack, model, turns):
            expected += picodollars(usage, audio_prices=model == "voice")
            usages.append(usage)
    details = [u["input_token_details"] for u in usages]
    # The run exercised every kind of token.
    assert all(sum(d[kind] for d in details) for kind in ("audio_tokens", "cached_tokens"))
    assert sum(u["output_token_details"]["audio_tokens"] for u in usages)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{stack.gateway_url}/v1/usage", headers={"Authorization": f"Bearer {KEY}"}
        ) as reply,
    ):
        report = await reply.json()
    rows = report["data"]
    assert sum(row["requests"] for row in rows) == len(usages)
    assert sum(row["input_tokens"] for row in rows) == sum(u["input_tokens"] for u in usages)
    assert sum(row["cached_input_tokens"] for row in rows) == sum(
        d["cached_tokens"] for d in details
    )
    assert sum(row["output_tokens"] for row in rows) == sum(u["output_tokens"] for u in usages)
    # To the micro-dollar (the ledger itself is exact, in pico-dollars).
    assert round(report["total_cost_usd"] * 1e6) == round(expected / 1e6)
    async with aiohttp.ClientSession() as http, http.get(f"{stack.gateway_url}/metrics") as reply:
        lines = (await reply.text()).splitlines()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("switchboard_gateway_cost_usd_total{")
    )
    assert abs(total - expected / 1e12) < 1e-9
