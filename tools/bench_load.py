"""Load benchmark: many paced streams through the whole stack, against the upstream directly.

The system under test, the whole `make run` stack (gateway, broker, session,
toolexec and Redis), runs pinned to one core (`--sut-core`, 1); the upstream
simulator and this load generator run pinned to another (`--client-core`, 0).
Every scenario runs on each path in the same run, one after the other:

- **direct**: streaming Chat Completions straight from the simulator (the
  baseline: what the upstream and the load generator alone achieve);
- **websocket**: the Realtime protocol on a persistent WebSocket per stream
  (`conversation.item.create` + `response.create`, then read to `response.done`);
- **sse**: streaming Chat Completions through the gateway's
  `POST /v1/chat/completions` (SSE; one request, so one new session, per round);
- **litellm** (with `--litellm PATH`): streaming Chat Completions through
  LiteLLM's proxy to the same simulator, the proxy pinned to the system under
  test's core: the gateway a user would pick instead. LiteLLM is not a
  Switchboard dependency: install it apart, e.g. `python3 -m venv /tmp/litellm
  && /tmp/litellm/bin/pip install 'litellm[proxy]'`, and pass
  `--litellm /tmp/litellm/bin/litellm`.

Scenarios: N paced streams for each N in `--streams` (each asks `--rounds`
times for `--tokens` tokens at `--delay-ms` per token, the streams' starts
spread over one token interval), a burst (one stream, no delay, `--burst-tokens`
tokens), and `--idle` idle connections (the gateway's memory per connection,
and what they cost each process per second while idle, over `--idle-s`: the
lease renewals and timers of connections that do nothing).

Per scenario it prints time to first token (TTFT: from sending the request, or
`response.create`, to the first text delta) p50/p99 and what Switchboard adds
over direct, delivered tokens/s (tokens are the simulator's words, however
many deltas carry them; over the scenario's wall time), the p99 gap between
two deltas of a stream, errors by code (a round the gateway sheds with
`server_busy` before creating its response waits the second it is told to,
then the stream goes on), CPU-seconds per 1k tokens for each process (from
/proc), and the gateway's memory per stream. It draws TTFT and throughput
against the number of streams to `--png`. `--shed-ms` sets the gateway's
load-shedding limit (`SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS`; 0 turns shedding
off, for measuring CPU per token on a machine busy enough to trip it).

    python -m tools.bench_load [--streams 1,50,200,400] [--paths websocket,sse]
        [--png docs/images/bench_load.png]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import websockets

from tools.stack import Ports, Stack

SUT = ("gateway", "broker", "session", "toolexec", "redis")
TICKS = os.sysconf("SC_CLK_TCK")
# A stream refused with `server_busy` asks again after this long (the gateway's retry_after).
RETRY_AFTER_S = 1.0


@dataclass
class Phase:
    """What one scenario's streams saw, for one of direct and switchboard."""

    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    gateway_rss_mib: tuple[float, float] = (0.0, 0.0)  # before, peak

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


class Stream:
    """One stream's timing: TTFT per response, gaps between deltas, tokens."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.asked = 0.0
        self.last: float | None = None

    def ask(self) -> None:
        self.asked = time.perf_counter()
        self.last = None

    def delta(self, text: str) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.phase.ttft_ms.append((now - self.asked) * 1000)
        else:
            self.phase.gaps_ms.append((now - self.last) * 1000)
        self.last = now
        self.phase.tokens += len(text.split())


def directive(tokens: int, delay_ms: int, tag: str) -> str:
    options = {"ttft_ms": 0, "token_delay_ms": delay_ms, "tokens": tokens}
    return f"load {tag} [[sim {orjson.dumps(options).decode()}]]"


async def direct_stream(
    http: aiohttp.ClientSession,
    url: str,
    phase: Phase,
    text: str,
    rounds: int,
    headers: dict[str, str] | None = None,
) -> None:
    """Chat Completions streamed from `url`: the simulator itself, or LiteLLM's proxy."""
    stream = Stream(phase)
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": text}]}
    for _ in range(rounds):
        stream.ask()
        async with http.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                phase.errors[f"http_{response.status}"] += 1
                continue
            async for line in response.content:
                if line.startswith(b"data: {"):
                    for choice in orjson.loads(line[6:]).get("choices", ()):
                        if content := choice["delta"].get("content"):
                            stream.delta(content)


async def sse_stream(
    http: aiohttp.ClientSession, url: str, key: str, phase: Phase, text: str, rounds: int
) -> None:
    """Chat Completions streamed through the gateway (the SSE path)."""
    stream = Stream(phase)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": text}]}
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(rounds):
        stream.ask()
        async with http.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                error = (await response.json())["error"]["code"]
                phase.errors[error] += 1
                if error == "server_busy":
                    await asyncio.sleep(RETRY_AFTER_S)
                continue
            async for line in response.content:
                if line.startswith(b"data: {"):
                    for choice in orjson.loads(line[6:]).get("choices", ()):
                        if content := choice["delta"].get("content"):
                            stream.delta(content)


async def switchboard_stream(url: str, key: str, phase: Phase, text: str, rounds: int) -> None:
    stream = Stream(phase)
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    say = orjson.dumps({"type": "conversation.item.create", "item": item}).decode()
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(
        url, additional_headers=headers, max_size=None, ping_interval=None
    ) as ws:
        await ws.recv()  # session.created
        for _ in range(rounds):
            await ws.send(say)
            stream.ask()
            await ws.send('{"type":"response.create"}')
            created = False
            while True:
                event = orjson.loads(await ws.recv())
                kind = event["type"]
                if kind == "response.output_text.delta":
                    stream.delta(event["delta"])
                elif kind == "response.created":
                    created = True
                elif kind == "error":
                    phase.errors[event["error"]["code"]] += 1
                    if not created and event["error"]["code"] == "server_busy":
                        # Shed before a response was created: wait as told, ask again.
                        await asyncio.sleep(RETRY_AFTER_S)
                        break
                elif kind == "response.done":
                    break


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Bench:
    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.pids = {name: stack.services[name].pid for name in SUT if name in stack.services}
        if stack.redis is not None and stack.redis.pid is not None:
            self.pids["redis"] = stack.redis.pid
        self.pids["simulator"] = stack.services["simulator"].pid
        self.pids["loadgen"] = os.getpid()
        self.http: aiohttp.ClientSession | None = None
        self.litellm: LiteLLM | None = None

    def pin(self) -> None:
        for name, pid in self.pids.items():
            core = self.args.client_core if name in ("simulator", "loadgen") else self.args.sut_core
            os.sched_setaffinity(pid, {core})
            for task in Path(f"/proc/{pid}/task").iterdir():  # every thread of it
                os.sched_setaffinity(int(task.name), {core})

    async def phase(
        self, kind: str, streams: int, tokens: int, delay_ms: int, rounds: int
    ) -> Phase:
        phase = Phase()
        url = f"{self.stack.simulator_url}/v1/chat/completions"
        ws_url = f"{self.stack.websocket_url}?model=gpt-realtime"
        sse_url = f"{self.stack.gateway_url}/v1/chat/completions"
        spread_s = delay_ms / 1000 if delay_ms else 0.0
        gateway = self.pids["gateway"]
        before_cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        before_rss, peak_rss = rss_mib(gateway), 0.0

        async def one(index: int) -> None:
            await asyncio.sleep(spread_s * index / max(1, streams))
            text = directive(tokens, delay_ms, f"{kind}-{streams}-{index}")
            try:
                if kind == "direct":
                    assert self.http is not None
                    await direct_stream(self.http, url, phase, text, rounds)
                elif kind == "litellm":
                    assert self.http is not None and self.litellm is not None
                    await direct_stream(
                        self.http, self.litellm.url, phase, text, rounds, self.litellm.headers
                    )
                elif kind == "sse":
                    assert self.http is not None
                    await sse_stream(self.http, sse_url, self.stack.dev_key, phase, text, rounds)
                else:
                    await switchboard_stream(ws_url, self.stack.dev_key, phase, text, rounds)
            except (OSError, websockets.WebSocketException, aiohttp.ClientError) as exc:
                phase.errors[type(exc).__name__] += 1

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, rss_mib(gateway))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_rss())
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        phase.wall_s = time.perf_counter() - start
        sampler.cancel()
        phase.cpu_s = {name: cpu_seconds(pid) - before_cpu[name] for name, pid in self.pids.items()}
        phase.gateway_rss_mib = (before_rss, peak_rss)
        return phase

    async def idle(self, count: int, hold_s: float) -> tuple[float, dict[str, float]]:
        """`count` idle connections: KiB of gateway memory per connection, and what
        they cost each process while they idle (CPU-ms per second, over `hold_s`)."""
        gateway = self.pids["gateway"]
        headers = {"Authorization": f"Bearer {self.stack.dev_key}"}
        url = f"{self.stack.websocket_url}?model=gpt-realtime"
        before = rss_mib(gateway)
        connections = []
        try:
            for _ in range(count):
                ws = await websockets.connect(url, additional_headers=headers, ping_interval=None)
                await ws.recv()
                connections.append(ws)
            # Past the first lease renewals, so opening costs nothing in the window.
            await asyncio.sleep(1.5)
            after = rss_mib(gateway)
            start_cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            start = time.perf_counter()
            await asyncio.sleep(hold_s)
            wall = time.perf_counter() - start
            cpu_ms = {
                name: 1000 * (cpu_seconds(pid) - start_cpu[name]) / wall
                for name, pid in self.pids.items()
                if name in SUT
            }
        finally:
            await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
        return (after - before) * 1024 / count, cpu_ms


class LiteLLM:
    """LiteLLM's proxy (one worker) in front of the simulator, for the litellm path."""

    def __init__(self, executable: str, simulator_url: str) -> None:
        self.executable = executable
        self.port = Ports.free().gateway
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        # LiteLLM refuses to start without a master key; it never leaves this process.
        key = "sk-bench-" + os.urandom(16).hex()
        self.headers = {"Authorization": f"Bearer {key}"}
        self.dir = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
        config = {
            "model_list": [
                {
                    "model_name": "sim",
                    "litellm_params": {
                        "model": "openai/sim",
                        "api_base": f"{simulator_url}/v1",
                        "api_key": "sk-simulator-not-a-secret",
                    },
                }
            ]
        }
        (self.dir / "config.json").write_bytes(orjson.dumps(config))
        self.env = {**os.environ, "LITELLM_MASTER_KEY": key}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _launch(self) -> None:
        config = str(self.dir / "config.json")
        argv = [self.executable, "--config", config, "--port", str(self.port), "--num_workers", "1"]
        with open(self.dir / "litellm.log", "wb") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)

    async def start(self, timeout_s: float = 90.0) -> None:
        await asyncio.to_thread(self._launch)
        assert self.process is not None
        health = f"http://127.0.0.1:{self.port}/health/liveliness"
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"litellm exited; see {self.dir / 'litellm.log'}")
                try:
                    async with http.get(health) as reply:
                        if reply.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"litellm not up after {timeout_s:g} s; see {self.dir / 'litellm.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(name: str, direct: Phase, paths: dict[str, Phase], streams: int) -> dict[str, float]:
    """Print one scenario: direct and each Switchboard path, and what each adds."""
    d50, d99 = pct(direct.ttft_ms, 0.5), pct(direct.ttft_ms, 0.99)
    print(f"\n{name}")
    print(f"  {'':12} {'TTFT p50':>10} {'TTFT p99':>10} {'tokens/s':>10} {'gap p99':>9} errors")
    for label, phase in (("direct", direct), *paths.items()):
        print(
            f"  {label:12} {pct(phase.ttft_ms, 0.5):8.2f}ms {pct(phase.ttft_ms, 0.99):8.2f}ms "
            f"{phase.tokens_per_s:10.0f} {pct(phase.gaps_ms, 0.99):7.1f}ms "
            f"{dict(phase.errors) or '-'}"
        )
    row = {"direct_tps": direct.tokens_per_s}
    for label, sb in paths.items():
        s50, s99 = pct(sb.ttft_ms, 0.5), pct(sb.ttft_ms, 0.99)
        ratio = sb.tokens_per_s / direct.tokens_per_s if direct.tokens_per_s else float("nan")
        print(
            f"  {label} adds TTFT p50 +{s50 - d50:.2f} ms, p99 +{s99 - d99:.2f} ms; "
            f"delivers x{ratio:.2f} the tokens/s of direct"
        )
        per_k = {name: 1000 * cpu / sb.tokens for name, cpu in sb.cpu_s.items() if sb.tokens}
        tested = ("litellm",) if label == "litellm" else SUT
        sut = sum(value for key, value in per_k.items() if key in tested)
        print(
            f"  {label} CPU-s per 1k tokens: "
            + ", ".join(f"{key} {value:.3f}" for key, value in per_k.items())
            + f" (system under test {sut:.3f})"
        )
        before, peak = sb.gateway_rss_mib
        if label != "litellm":
            print(
                f"  {label} gateway RSS {before:.1f} -> {peak:.1f} MiB "
                f"({(peak - before) * 1024 / max(1, streams):.1f} KiB per stream)"
            )
        row.update(
            {f"{label}_p50": s50 - d50, f"{label}_p99": s99 - d99, f"{label}_tps": sb.tokens_per_s}
        )
    direct_k = {key: 1000 * cpu / direct.tokens for key, cpu in direct.cpu_s.items()}
    print(
        f"  direct CPU-s per 1k tokens: simulator {direct_k.get('simulator', 0):.3f}, "
        f"loadgen {direct_k.get('loadgen', 0):.3f}"
    )
    return row


def draw(path: Path, rows: dict[int, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = [
        (k, m)
        for k, m in (("websocket", "o"), ("sse", "s"), ("litellm", "d"))
        if f"{k}_p50" in rows[counts[0]]
    ]
    for kind, marker in drawn:
        left.plot(
            counts, [rows[n][f"{kind}_p50"] for n in counts], f"{marker}-", label=f"{kind} p50"
        )
        left.plot(
            counts, [rows[n][f"{kind}_p99"] for n in counts], f"{marker}--", label=f"{kind} p99"
        )
    left.set(xlabel="paced streams", ylabel="TTFT added over direct (ms)", yscale="symlog")
    left.legend()
    right.plot(counts, [rows[n]["direct_tps"] for n in counts], "^-", label="direct")
    for kind, marker in drawn:
        right.plot(counts, [rows[n][f"{kind}_tps"] for n in counts], f"{marker}-", label=kind)
    right.set(xlabel="paced streams", ylabel="delivered tokens/s")
    right.legend()
    fig.suptitle("Switchboard on one core vs the upstream directly (tools/bench_load.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\ndrew {path}")


def shedding(shed_ms: float | None) -> dict[str, str]:
    """The gateway's load-shedding limit: its default unless `--shed-ms` is given."""
    return {} if shed_ms is None else {"SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS": f"{shed_ms:g}"}


async def run(args: argparse.Namespace) -> None:
    stack = Stack(
        ports=Ports.free(),
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            "SWITCHBOARD_BROKER_MAX_CONCURRENT": str(args.max_concurrent),
            "SWITCHBOARD_BROKER_MAX_QUEUED": str(args.max_concurrent),
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            **shedding(args.shed_ms),
        },
    )
    await asyncio.to_thread(stack.start)
    litellm = None
    try:
        bench = Bench(stack, args)
        kinds: tuple[str, ...] = ("direct", *(k for k in args.paths.split(",") if k != "direct"))
        if args.litellm:
            litellm = bench.litellm = LiteLLM(args.litellm, stack.simulator_url)
            await litellm.start()
            bench.pids["litellm"] = litellm.pid
            kinds = (*kinds, "litellm")
        bench.pin()
        print(
            f"system under test on core {args.sut_core} ({', '.join(SUT)}); simulator and load "
            f"generator on core {args.client_core}; broker max concurrent {args.max_concurrent}"
        )
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            headers={"Authorization": "Bearer sk-simulator-not-a-secret"},
        ) as http:
            bench.http = http
            # Warm up every path; not counted.
            for kind in kinds:
                await bench.phase(kind, 4, 16, 0, 1)
            rows: dict[int, dict[str, float]] = {}
            for streams in args.streams:
                phases = {
                    kind: await bench.phase(kind, streams, args.tokens, args.delay_ms, args.rounds)
                    for kind in kinds
                }
                name = f"{streams} paced stream(s): {args.tokens} tokens at {args.delay_ms} ms"
                direct = phases.pop("direct")
                rows[streams] = describe(name, direct, phases, streams)
            phases = {kind: await bench.phase(kind, 1, args.burst_tokens, 0, 1) for kind in kinds}
            direct = phases.pop("direct")
            describe(f"burst: 1 stream, {args.burst_tokens} tokens, no delay", direct, phases, 1)
        if args.idle:
            per_connection, cpu_ms = await bench.idle(args.idle, args.idle_s)
            print(f"\n{args.idle} idle connections: {per_connection:.1f} KiB each in the gateway")
            print(
                f"  CPU-ms per second while they idle ({args.idle_s:g} s): "
                + ", ".join(f"{name} {value:.1f}" for name, value in cpu_ms.items())
                + f" (system under test {sum(cpu_ms.values()):.1f})"
            )
        if args.png:
            draw(Path(args.png), rows)
    finally:
        if litellm is not None:
            litellm.stop()
        await asyncio.to_thread(stack.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--streams", type=lambda s: [int(n) for n in s.split(",")], default=[1, 50, 200, 400]
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--delay-ms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burst-tokens", type=int, default=20000)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--max-concurrent", type=int, default=256)
    parser.add_argument(
        "--shed-ms", type=float, help="the gateway's load-shedding limit (0: off); its default"
    )
    parser.add_argument(
        "--paths", default="websocket,sse", help="Switchboard paths measured besides direct"
    )
    parser.add_argument("--sut-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    parser.add_argument("--png", default="docs/images/bench_load.png")
    parser.add_argument("--litellm", help="the `litellm` executable of a LiteLLM install")
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
