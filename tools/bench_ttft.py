"""Benchmark: time to first token and tokens/s through the gateway vs the simulator directly.

Starts the whole stack (the same launcher as `make run`) on free ports, then
runs the same requests twice in one run:

- **direct**: Chat Completions streaming straight to the upstream simulator;
- **gateway**: a Realtime WebSocket turn through gateway -> session -> broker
  -> simulator.

TTFT is measured at the client: from sending the request (`response.create`)
to receiving the first text delta. Tokens/s is tokens (the simulator's words,
however many deltas carry them) received per second of streaming. It prints
both, with the gateway/direct ratio, for a latency profile (the simulator
waits before the first token, as a model does) and a throughput profile (no
delays, long replies, several streams at once).

With `--tracing` every service exports its spans (OpenTelemetry over OTLP/HTTP)
to a real receiver in this process (tools/otlp_receiver.py), to measure what
tracing costs; without it tracing is off, as it is when no endpoint is set.

    python -m tools.bench_ttft [--runs 30] [--concurrency 8] [--tracing]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp
import orjson
import websockets

from tools.otlp_receiver import OtlpReceiver
from tools.stack import Ports, Stack


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    stream_s: float


@dataclass
class Profile:
    name: str
    ttft_ms: int
    token_delay_ms: int
    tokens: int
    concurrency: int

    def directive(self, run: int) -> str:
        options = {
            "ttft_ms": self.ttft_ms,
            "token_delay_ms": self.token_delay_ms,
            "tokens": self.tokens,
        }
        return f"benchmark run {run} [[sim {orjson.dumps(options).decode()}]]"


async def direct_once(http: aiohttp.ClientSession, base_url: str, text: str) -> Sample:
    body = {
        "model": "sim-small",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": text}],
    }
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    async with http.post(f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices", ()):
                if content := choice["delta"].get("content"):
                    tokens += len(content.split())
                    if not first:
                        first = time.perf_counter()
    end = time.perf_counter()
    return Sample(first - start, tokens, end - first)


async def gateway_once(url: str, key: str, text: str) -> Sample:
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()  # session.created
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }
        await ws.send(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
        while orjson.loads(await ws.recv())["type"] != "conversation.item.done":
            pass
        start = time.perf_counter()
        await ws.send('{"type": "response.create"}')
        first = 0.0
        tokens = 0
        while True:
            event = orjson.loads(await ws.recv())
            if event["type"] == "response.output_text.delta":
                # A slow reader gets merged deltas: count the words (the
                # simulator's tokens), not the events.
                tokens += len(event["delta"].split())
                if not first:
                    first = time.perf_counter()
            elif event["type"] == "response.done":
                if event["response"]["status"] != "completed":
                    raise RuntimeError(f"response ended {event['response']['status']}")
                break
        end = time.perf_counter()
    return Sample(first - start, tokens, end - first)


async def run_profile(stack: Stack, profile: Profile, runs: int) -> dict[str, list[Sample]]:
    results: dict[str, list[Sample]] = {"direct": [], "gateway": []}
    semaphore = asyncio.Semaphore(profile.concurrency)
    url = f"{stack.websocket_url}?model=gpt-realtime"

    async with aiohttp.ClientSession() as http:

        async def one(kind: str, run: int) -> None:
            async with semaphore:
                text = profile.directive(run)
                if kind == "direct":
                    sample = await direct_once(http, f"{stack.simulator_url}/v1", text)
                else:
                    sample = await gateway_once(url, stack.dev_key, text)
                results[kind].append(sample)

        # Warm up connections and code paths; not counted.
        await one("direct", -1)
        await one("gateway", -1)
        results = {"direct": [], "gateway": []}
        # One kind after the other, same stack, same run: the ratio compares like with like.
        for kind in ("direct", "gateway"):
            await asyncio.gather(*(one(kind, run) for run in range(runs)))
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(profile: Profile, results: dict[str, list[Sample]]) -> None:
    print(
        f"\n{profile.name}: simulator ttft={profile.ttft_ms}ms delay={profile.token_delay_ms}ms "
        f"tokens={profile.tokens}, concurrency={profile.concurrency}, runs={len(results['direct'])}"
    )
    print(
        f"  {'':8} {'ttft p50':>10} {'ttft p95':>10} {'tokens/s/stream':>16} {'tokens/s total':>15}"
    )
    rows = {}
    for kind, samples in results.items():
        ttft = [s.ttft_s * 1000 for s in samples]
        rate = [s.tokens / s.stream_s for s in samples if s.stream_s > 0]
        total_tokens = sum(s.tokens for s in samples)
        wall = sum(s.ttft_s + s.stream_s for s in samples) / max(1, profile.concurrency)
        rows[kind] = (
            statistics.median(ttft),
            percentile(ttft, 0.95),
            statistics.median(rate) if rate else 0.0,
            total_tokens / wall if wall else 0.0,
        )
        p50, p95, per_stream, total = rows[kind]
        print(f"  {kind:8} {p50:9.1f}ms {p95:9.1f}ms {per_stream:16.0f} {total:15.0f}")
    d, g = rows["direct"], rows["gateway"]
    print(
        f"  gateway/direct: ttft p50 x{g[0] / d[0]:.2f} (+{g[0] - d[0]:.1f} ms), "
        f"ttft p95 x{g[1] / d[1]:.2f}, tokens/s per stream x{g[2] / d[2]:.2f}, "
        f"tokens/s total x{g[3] / d[3]:.2f}"
    )


async def main_async(runs: int, concurrency: int, tracing: bool) -> None:
    profiles = [
        Profile("latency", ttft_ms=100, token_delay_ms=10, tokens=50, concurrency=1),
        Profile("throughput", ttft_ms=0, token_delay_ms=0, tokens=2000, concurrency=concurrency),
    ]
    receiver = OtlpReceiver().start() if tracing else None
    # An empty endpoint turns tracing off even when this shell exports one.
    endpoint = receiver.endpoint if receiver is not None else ""
    stack = Stack(ports=Ports.free(), extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    print(f"tracing: {'on, exporting to ' + endpoint if endpoint else 'off'}")
    await asyncio.to_thread(stack.start)
    try:
        for profile in profiles:
            report(profile, await run_profile(stack, profile, runs))
    finally:
        await asyncio.to_thread(stack.stop)
        if receiver is not None:
            receiver.stop()
            print(f"\nspans received: {len(receiver.spans())} in {receiver.requests} exports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--tracing", action="store_true", help="export every span to a local OTLP receiver"
    )
    args = parser.parse_args()
    asyncio.run(main_async(args.runs, args.concurrency, args.tracing))


if __name__ == "__main__":
    main()
