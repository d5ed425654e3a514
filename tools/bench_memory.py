"""Benchmark: gateway memory per connection and the concurrent streams one gateway
process sustains on this machine.

Starts the whole stack (the launcher of `make run`) on free ports and reads the
gateway process's resident memory (VmRSS) at rest, with N idle connections, and
with N streams running (each a slow, long reply, so all N stream at once). Then it
raises the number of concurrent streams step by step (each stream asks for
`--rate` tokens/s) and reports, per step, the share of the expected tokens the
clients received and the inter-token gap p95; a step is sustained when every
stream completes and receives at least 90% of its expected rate.

Everything (simulator, four services, clients) shares this machine's cores, so
the ceiling is the machine's as much as the gateway's.

    python -m tools.bench_memory [--connections 400] [--steps 50,100,200,400]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import orjson
import websockets

from tools.stack import Ports, Stack


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def settle(pid: int, seconds: float = 1.5) -> int:
    await asyncio.sleep(seconds)
    return rss_kib(pid)


def ask(text: str) -> list[str]:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return [
        orjson.dumps({"type": "conversation.item.create", "item": item}).decode(),
        '{"type":"response.create"}',
    ]


async def open_connections(stack: Stack, count: int, exits: AsyncExitStack) -> list[Any]:
    headers = {"Authorization": f"Bearer {stack.dev_key}"}
    connections = []
    for start in range(0, count, 50):
        batch = await asyncio.gather(
            *(
                exits.enter_async_context(
                    websockets.connect(
                        f"{stack.websocket_url}?model=gpt-realtime",
                        additional_headers=headers,
                        max_size=None,
                    )
                )
                for _ in range(min(50, count - start))
            )
        )
        for connection in batch:
            await connection.recv()  # session.created
        connections.extend(batch)
    return connections


async def stream(connection: Any, text: str, expected_tokens: int) -> tuple[int, list[float], str]:
    """Ask and read to response.done: words received, gaps between deltas, status."""
    for frame in ask(text):
        await connection.send(frame)
    words, last = 0, None
    gaps: list[float] = []
    while True:
        event = orjson.loads(await asyncio.wait_for(connection.recv(), 120))
        kind = event["type"]
        if kind == "response.output_text.delta":
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            words += event["delta"].count(" ") + (1 if event["delta"].strip() else 0)
        elif kind == "response.done":
            return min(words, expected_tokens), gaps, event["response"]["status"]


async def memory(stack: Stack, pid: int, count: int) -> None:
    base = await settle(pid)
    async with AsyncExitStack() as exits:
        connections = await open_connections(stack, count, exits)
        idle = await settle(pid)
        directive = '[[sim {"ttft_ms": 50, "token_delay_ms": 100, "tokens": 100}]]'
        tasks = [
            asyncio.create_task(stream(c, f"memory {n} {directive}", 100))
            for n, c in enumerate(connections)
        ]
        await asyncio.sleep(4)  # every stream is mid-reply now
        active = rss_kib(pid)
        results = await asyncio.gather(*tasks)
        after = await settle(pid)
    closed = await settle(pid, 3)
    completed = sum(status == "completed" for _, _, status in results)
    print(f"gateway RSS at rest: {base / 1024:.1f} MiB")
    print(
        f"{count} idle connections: {idle / 1024:.1f} MiB, "
        f"{(idle - base) / count:.1f} KiB per connection"
    )
    print(
        f"{count} active streams: {active / 1024:.1f} MiB, "
        f"{(active - idle) / count:.1f} KiB per stream beyond an idle connection "
        f"({completed}/{count} completed)"
    )
    print(f"after the streams: {after / 1024:.1f} MiB; all closed: {closed / 1024:.1f} MiB")


async def ceiling(stack: Stack, steps: list[int], rate: int, seconds: int) -> None:
    tokens = rate * seconds
    delay_ms = 1000 // rate
    directive = f'[[sim {{"ttft_ms": 50, "token_delay_ms": {delay_ms}, "tokens": {tokens}}}]]'
    print(f"\nconcurrent streams at {rate} tokens/s each, {tokens} tokens per stream:")
    print("streams  completed  received/expected  gap p95 (ms)  sustained")
    for count in steps:
        async with AsyncExitStack() as exits:
            connections = await open_connections(stack, count, exits)
            started = time.monotonic()
            results = await asyncio.gather(
                *(stream(c, f"ceiling {n} {directive}", tokens) for n, c in enumerate(connections)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        ok = [r for r in results if not isinstance(r, BaseException)]
        completed = sum(status == "completed" for _, _, status in ok)
        received = sum(words for words, _, _ in ok)
        gaps = sorted(g for _, gs, _ in ok for g in gs)
        p95 = gaps[int(len(gaps) * 0.95)] * 1000 if gaps else float("nan")
        # Expected: every token of every stream within the stream's own duration;
        # the rate each client saw is its tokens over the time the step took.
        expected_rate = count * rate
        seen_rate = received / elapsed
        share = seen_rate / expected_rate
        sustained = completed == count and share >= 0.9
        verdict = "yes" if sustained else "no"
        print(f"{count:7d}  {completed:9d}  {share:17.2f}  {p95:12.1f}  {verdict}")
        if not sustained:
            break


async def main_async(args: argparse.Namespace) -> None:
    # The broker's admission control would queue and shed most of these streams
    # (one tenant, one upstream): lift it, this measures the gateway.
    steps = [int(s) for s in args.steps.split(",")]
    unlimited = str(max(args.connections, *steps) * 4)
    stack = Stack(
        ports=Ports.free(),
        extra_env={
            "SWITCHBOARD_BROKER_MAX_CONCURRENT": unlimited,
            "SWITCHBOARD_BROKER_MAX_QUEUED": unlimited,
            "SWITCHBOARD_BROKER_MAX_QUEUED_PER_TENANT": unlimited,
        },
    )
    stack.start()
    try:
        pid = stack.services["gateway"].process.pid  # type: ignore[union-attr]
        for name, service in stack.services.items():
            print(f"{name}: pid {service.process.pid}")  # type: ignore[union-attr]
        await memory(stack, pid, args.connections)
        await ceiling(stack, steps, args.rate, args.seconds)
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--steps", default="50,100,200,400,800")
    parser.add_argument("--rate", type=int, default=10, help="tokens/s of each stream")
    parser.add_argument("--seconds", type=int, default=10, help="length of each stream")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
