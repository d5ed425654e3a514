"""A few minutes of varied traffic for pictures of the dashboards (tools/render_panels.py).

Against a running stack (tools/stack.py) whose tenants file `write_tenants()`
wrote: four chatting clients on two models, with first tokens mostly fast and,
during the middle third of the run, slow on `gpt-realtime-mini` (an upstream
having a bad quarter of an hour, compressed); some clients hang up while the
answer streams; a client with a wrong key now and then (`auth`); a tenant
allowed one connection at a time that keeps opening two (`quota`). The upstream
is the SIMULATOR: `[[sim ...]]` directives set each reply's time to first token.
Random choices are seeded, so runs look alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import websockets

from switchboard.tenancy import hash_key, new_key
from tools.stack import Ports, Stack

ACME_KEY, CROWD_KEY = new_key(), new_key()
MODELS = ("gpt-realtime", "gpt-realtime-mini")


@contextlib.contextmanager
def tenants_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="switchboard-demo-") as directory:
        yield Path(directory)


def write_tenants(directory: Path, ports: Ports) -> Path:
    """The demo's tenants file, its upstream the stack's simulator."""
    path = directory / "tenants.yaml"
    path.write_text(
        f"""
upstreams:
  default:
    base_url: http://127.0.0.1:{ports.simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
tenants:
  acme:
    keys: ["{hash_key(ACME_KEY)}"]
    tier: standard
    models: {{gpt-realtime: {{}}, gpt-realtime-mini: {{}}}}
  crowd:
    keys: ["{hash_key(CROWD_KEY)}"]
    tier: free
    models: {{gpt-realtime: {{}}}}
    limits: {{concurrent_connections: 1}}
"""
    )
    return path


def _connect(stack: Stack, key: str, model: str) -> websockets.connect:
    return websockets.connect(
        f"{stack.websocket_url}?model={model}",
        additional_headers={"Authorization": f"Bearer {key}"},
    )


async def _send(connection: websockets.ClientConnection, event: dict[str, object]) -> None:
    await connection.send(json.dumps(event))


async def _until(connection: websockets.ClientConnection, event_type: str) -> None:
    while json.loads(await asyncio.wait_for(connection.recv(), 30))["type"] != event_type:
        pass


def _ttft_ms(rng: random.Random, model: str, incident: bool) -> int:
    if incident and model == "gpt-realtime-mini":
        return int(rng.uniform(700, 1900))
    return int(rng.lognormvariate(5.3, 0.35))  # about 200 ms, a tail to 500 ms


async def _chatter(stack: Stack, rng: random.Random, clock: _Clock) -> None:
    while not clock.over():
        model = rng.choice(MODELS)
        async with _connect(stack, ACME_KEY, model) as connection:
            await _until(connection, "session.created")
            for turn in range(rng.randint(2, 4)):
                directive = {"ttft_ms": _ttft_ms(rng, model, clock.incident())}
                text = f"question {turn} [[sim {json.dumps(directive)}]]"
                content = [{"type": "input_text", "text": text}]
                item = {"type": "message", "role": "user", "content": content}
                await _send(connection, {"type": "conversation.item.create", "item": item})
                await _send(connection, {"type": "response.create"})
                if rng.random() < 0.1:
                    await _until(connection, "response.output_text.delta")
                    break  # hang up mid-answer
                await _until(connection, "response.done")
                await asyncio.sleep(rng.uniform(0.2, 1.0))
        await asyncio.sleep(rng.uniform(0.2, 1.5))


async def _intruder(stack: Stack, rng: random.Random, clock: _Clock) -> None:
    while not clock.over():
        with contextlib.suppress(websockets.InvalidStatus):
            async with _connect(stack, "sk-sb-wrong-key-for-the-demo-0000", "gpt-realtime"):
                pass
        await asyncio.sleep(rng.uniform(2, 6))


async def _crowd(stack: Stack, rng: random.Random, clock: _Clock) -> None:
    async def one() -> None:
        with contextlib.suppress(websockets.InvalidStatus, websockets.ConnectionClosed):
            async with _connect(stack, CROWD_KEY, "gpt-realtime") as connection:
                await _until(connection, "session.created")
                await asyncio.sleep(1.0)

    while not clock.over():
        await asyncio.gather(one(), one())
        await asyncio.sleep(rng.uniform(3, 8))


class _Clock:
    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._seconds = seconds

    def _elapsed(self) -> float:
        return (self._loop.time() - self._start) / self._seconds

    def over(self) -> bool:
        return self._elapsed() >= 1

    def incident(self) -> bool:
        return 1 / 3 <= self._elapsed() < 2 / 3


async def run(stack: Stack, seconds: float, *, seed: int = 7) -> None:
    """Drive the demo traffic for `seconds`, then let every client finish."""
    clock = _Clock(seconds)
    rng = random.Random(seed)
    workers = [_chatter(stack, random.Random(rng.random()), clock) for _ in range(4)]
    workers.append(_intruder(stack, random.Random(rng.random()), clock))
    workers.append(_crowd(stack, random.Random(rng.random()), clock))
    await asyncio.gather(*workers)
