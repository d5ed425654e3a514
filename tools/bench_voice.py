"""Benchmark: voice sessions through the gateway vs straight to the upstream simulator.

Starts the whole stack (the launcher of `make run`) on free ports, then runs N
concurrent voice sessions twice in one run, each streaming 2 s of input audio
in real time (20 ms chunks) and then asking for a spoken reply:

- **direct**: the simulator's Realtime WebSocket (`gpt-realtime`);
- **gateway**: `/v1/realtime?model=gpt-realtime-voice`: gateway -> broker
  (RealtimeService) -> the simulator.

Time to first audio (TTFA) is measured at the client, from sending
`input_audio_buffer.commit` + `response.create` to the first
`response.output_audio.delta`; the simulator waits `--ttfa-ms` itself, the
same both ways, so the difference is what Switchboard adds. Jitter is the gap
between consecutive audio deltas at the client beyond the simulator's own
schedule (`--chunk-ms` apart): "extra gap". The simulator stamps each delta
with when it sent it (`stamp_audio`, docs/simulator.md; one clock for every
process of the machine), so the gap a delta's way added beyond the one the
upstream made is known too: "added gap" is the gap between two consecutive
deltas at the client minus the gap between their sends (the second's delay
minus the first's), what the target "no audio gap over 40 ms that the
upstream did not make" is about; "delay" is from send to receipt. CPU and
memory per session are the gateway's and broker's (from /proc) while the
gateway round runs: CPU as milliseconds per session over the round (the work
done, whatever else runs on the machine) and as a share of a core (which a
busy machine lowers by stretching the round).

As `tools/bench_load.py` does, the system under test (gateway, broker,
session, toolexec, Redis) is pinned to one core (`--sut-core`, default 1) and
the simulator and this load generator to the other (`--client-core`, 0), so
the direct round and the gateway round load the client side alike.

    python -m tools.bench_voice [--sessions 20] [--ttfa-ms 50] [--chunk-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import orjson
import websockets

from tools.bench_load import SUT, cpu_seconds, rss_mib
from tools.stack import SIMULATOR_KEY, Ports, Stack

RATE_BYTES_PER_MS = 48
# The target: no audio gap over 40 ms that the upstream did not make.
ADDED_GAP_BOUND_MS = 40
TONE = base64.b64encode(bytes(RATE_BYTES_PER_MS * 20)).decode()  # 20 ms of silence
INPUT_CHUNKS = 100  # 2 s


@dataclass
class Sample:
    ttfa_s: float
    gaps_s: list[float] = field(default_factory=list)
    # Each delta's time from the simulator's send to its receipt here.
    delays_s: list[float] = field(default_factory=list)

    def added_gaps_s(self) -> list[float]:
        """Each gap at the client minus the gap between the same two sends."""
        return [after - before for before, after in itertools.pairwise(self.delays_s)]


async def one_session(url: str, key: str, reply_ms: int) -> Sample:
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(url, additional_headers=headers, max_size=2**24) as ws:
        await ws.recv()  # session.created
        directive = f'"transcript": "hello there", "audio_ms": {reply_ms}, "stamp_audio": true'
        instructions = f"[[sim {{{directive}}}]]"
        update = {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": instructions,
                "audio": {"input": {"turn_detection": None}},
            },
        }
        await ws.send(orjson.dumps(update).decode())
        start = time.monotonic()
        for index in range(INPUT_CHUNKS):  # real time, on an absolute schedule
            event = {"type": "input_audio_buffer.append", "audio": TONE}
            await ws.send(orjson.dumps(event).decode())
            await asyncio.sleep(max(0.0, start + (index + 1) * 0.02 - time.monotonic()))
        sent = time.monotonic()
        await ws.send('{"type":"input_audio_buffer.commit"}')
        await ws.send('{"type":"response.create"}')
        first: float | None = None
        last = 0.0
        gaps: list[float] = []
        delays: list[float] = []
        while True:
            frame = await asyncio.wait_for(ws.recv(), 30)
            event = orjson.loads(frame)
            kind = event.get("type")
            if kind == "response.output_audio.delta":
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                delays.append(now - event["sim_sent_at"])
            elif kind == "response.done":
                break
            elif kind == "error":
                raise RuntimeError(frame)
        assert first is not None, "no audio"
        return Sample(first - sent, gaps, delays)


def pin(pids: dict[str, int], sut_core: int, client_core: int) -> None:
    """Every thread of the system under test on one core, the client side on the other."""
    for name, pid in pids.items():
        core = client_core if name in ("simulator", "loadgen") else sut_core
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), {core})


def pct(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run_round(url: str, key: str, sessions: int, reply_ms: int) -> list[Sample]:
    return list(await asyncio.gather(*(one_session(url, key, reply_ms) for _ in range(sessions))))


async def main_async(args: argparse.Namespace) -> None:
    sessions, ttfa_ms, chunk_ms = args.sessions, args.ttfa_ms, args.chunk_ms
    reply_ms = args.reply_ms
    stack = Stack(
        ports=Ports.free(),
        simulator_args=["--ttft-ms", str(ttfa_ms), "--token-delay-ms", str(chunk_ms)],
        # A voice session holds an admission slot of its upstream for its life.
        extra_env={"SWITCHBOARD_BROKER_MAX_CONCURRENT": str(max(64, sessions * 2))},
    )
    with stack:
        direct_url = f"ws://127.0.0.1:{stack.ports.simulator}/v1/realtime?model=gpt-realtime"
        gateway_url = f"{stack.websocket_url}?model=gpt-realtime-voice"
        pids = {name: stack.services[name].pid for name in SUT if name in stack.services}
        if stack.redis is not None and stack.redis.pid is not None:
            pids["redis"] = stack.redis.pid
        pids["simulator"] = stack.services["simulator"].pid
        pids["loadgen"] = os.getpid()
        if not args.no_pin:
            pin(pids, args.sut_core, args.client_core)
        await run_round(gateway_url, stack.dev_key, 2, reply_ms)  # warm up
        direct = await run_round(direct_url, SIMULATOR_KEY, sessions, reply_ms)
        relays = [pids["gateway"], pids["broker"]]
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        rss_before = sum(rss_mib(pid) for pid in relays) * 1024
        began = time.monotonic()
        gateway = await run_round(gateway_url, stack.dev_key, sessions, reply_ms)
        wall = time.monotonic() - began
        cpu_by = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        cpu = cpu_by["gateway"] + cpu_by["broker"]
        rss = sum(rss_mib(pid) for pid in relays) * 1024 - rss_before
    print(
        f"{sessions} concurrent voice sessions, simulator TTFA {ttfa_ms} ms,"
        f" chunks {chunk_ms} ms apart"
    )
    for name, samples in (("direct", direct), ("gateway", gateway)):
        ttfa = [s.ttfa_s * 1000 for s in samples]
        gaps = [(g * 1000) - chunk_ms for s in samples for g in s.gaps_s]
        print(
            f"  {name:8} TTFA p50 {statistics.median(ttfa):7.1f} ms  p99 {pct(ttfa, 0.99):7.1f} ms"
            f"   extra gap p99 {pct(gaps, 0.99):6.1f} ms  max {max(gaps):6.1f} ms"
        )
    for name, samples in (("direct", direct), ("gateway", gateway)):
        added = [g * 1000 for s in samples for g in s.added_gaps_s()]
        delays = [d * 1000 for s in samples for d in s.delays_s]
        over = sum(1 for g in added if g > ADDED_GAP_BOUND_MS)
        print(
            f"  {name:8} added gap p99 {pct(added, 0.99):6.1f} ms  max {max(added):6.1f} ms"
            f"  over {ADDED_GAP_BOUND_MS} ms: {over} of {len(added)}"
            f"   delay p50 {statistics.median(delays):6.1f} ms  p99 {pct(delays, 0.99):6.1f} ms"
        )
    d50 = statistics.median(s.ttfa_s for s in direct) * 1000
    g50 = statistics.median(s.ttfa_s for s in gateway) * 1000
    d99 = pct([s.ttfa_s * 1000 for s in direct], 0.99)
    g99 = pct([s.ttfa_s * 1000 for s in gateway], 0.99)
    print(f"  added by the gateway: TTFA p50 {g50 - d50:+.1f} ms, p99 {g99 - d99:+.1f} ms")
    # CPU time per session over the round is the work done; the share of a core
    # also falls when a busy machine stretches the round.
    print(
        f"  gateway+broker: CPU {cpu / sessions * 1000:.1f} ms per session over the round"
        f" (gateway {cpu_by['gateway'] / sessions * 1000:.1f}, broker"
        f" {cpu_by['broker'] / sessions * 1000:.1f}), {cpu / sessions / wall * 100:.2f}% of a"
        f" core per session, RSS {rss / sessions:+.0f} KiB per session (after the round)"
    )
    busy = "  ".join(f"{name} {seconds / wall * 100:.0f}%" for name, seconds in cpu_by.items())
    print(f"  CPU during the gateway round, % of a core: {busy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--ttfa-ms", type=int, default=50)
    parser.add_argument("--chunk-ms", type=int, default=20)
    parser.add_argument("--reply-ms", type=int, default=2000)
    parser.add_argument("--sut-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true", help="leave the scheduler alone")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
