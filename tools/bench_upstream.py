"""Benchmark: the broker's CPU per token, against a baseline broker in the same run.

The broker under test runs in its own process pinned to one core
(`--sut-core`, 1): the real servicer (`switchboard.broker.service.running`)
behind a real grpc.aio server, streaming from the upstream simulator, which
runs with this load generator (a gRPC client of the broker) on another core
(`--client-core`, 0). The same scenarios run against two brokers, one after
the other, in the same run, the baseline first:

- the baseline, by default **sdk**: the broker's upstream client before issue
  18, kept here as `SdkClients`: an `openai.AsyncOpenAI` on the SDK's aiohttp
  transport (`DefaultAioHttpClient`, httpx2 on top of aiohttp), the body read
  raw with `with_streaming_response` and decoded by the broker's own
  `SseDecoder`; with `--against REF`, the broker of git commit REF instead
  (its source exported with `git archive` to a temporary directory, run with
  its own aiohttp client): the figure for a change to the broker;
- **aiohttp**: the broker as it is (`switchboard.broker.clients`).

Scenarios: **paced** (`--paced-streams` streams of `--paced-tokens` tokens at
`--delay-ms` per token: one token per upstream read, as from a real model) and
**burst** (`--burst-streams` streams of `--burst-tokens` tokens, no delay:
many tokens per read). Each runs three ways: through the broker's `Stream`
call (**stream**: every call multiplexed over one gRPC stream, as the gateway
calls it), through one `Generate` call per stream (**broker**), and by the
upstream client alone (**client**: no gRPC, no broker). For each it prints the
broker's CPU-microseconds per token (utime + stime from /proc over the
scenario) and, with `--callgrind` (valgrind installed), the instructions it
executed per token, counted by callgrind between two points of the same
process (start-up and warm-up left out): a figure without timing noise.
Ratios are aiohttp (this tree) / the baseline.

    python -m tools.bench_upstream [--callgrind] [--against main] [--paced-streams 50]

The broker process is also this module: `python -m tools.bench_upstream serve
--client {sdk,aiohttp} --upstream URL` prints `broker listening on HOST:PORT`
and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import openai
import orjson

from switchboard.broker.chat_stream import DONE, SseDecoder, upstream_host
from switchboard.broker.clients import UpstreamClient, UpstreamClients
from switchboard.broker.service import running
from switchboard.config import BrokerSettings
from switchboard.telemetry.logs import configure_logging
from switchboard.tenancy import Upstream, hash_key, load_tenants
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2, session_pb2
from tools.bench_load import cpu_seconds

TENANT = "bench"
CLIENTS = ("sdk", "aiohttp")
# Through the broker's multiplexed Stream, through Generate, and the upstream client alone.
PATHS = ("stream", "broker", "client")


# ----------------------------------------------------- the baseline: the SDK path


class SdkStream:
    """The broker's `ChatStream` before issue 18, on the success path (what is measured)."""

    def __init__(self, client: openai.AsyncOpenAI, payload: dict[str, Any]) -> None:
        self._client = client
        self._payload = payload
        self._response: openai.AsyncAPIResponse[Any] | None = None
        self._reader: AsyncIterator[Any] | None = None
        self.request_id: str | None = None

    async def __aenter__(self) -> SdkStream:
        manager = self._client.chat.completions.with_streaming_response.create(**self._payload)
        self._response = await manager.__aenter__()
        self.request_id = self._response.request_id
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        response, self._response = self._response, None
        if response is not None:
            await response.close()

    def close_soon(self) -> None:
        """Nothing to do: the bench's streams are always read to the end."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        assert self._response is not None
        return self._chunks(self._response)

    async def read(self) -> list[dict[str, Any]] | None:
        """`ChatStream.read`'s interface (one chunk per call here), as the dispatcher reads."""
        if self._reader is None:
            assert self._response is not None
            self._reader = self._chunks(self._response)
        return [chunk] if (chunk := await anext(self._reader, None)) is not None else None

    async def _chunks(self, response: openai.AsyncAPIResponse[Any]) -> AsyncIterator[Any]:
        decoder = SseDecoder()
        async for data in response.iter_bytes():
            for event in decoder.feed(data):
                if event == DONE:
                    return
                yield orjson.loads(event)


class SdkClient:
    def __init__(self, upstream: Upstream, settings: BrokerSettings) -> None:
        timeout = openai.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
        self._client = openai.AsyncOpenAI(
            base_url=upstream.base_url,
            api_key=upstream.api_key.reveal() or "no-key-configured",
            http_client=openai.DefaultAioHttpClient(timeout=timeout),
            max_retries=0,
            timeout=timeout,
        )
        self.description = f"{upstream.name} ({upstream_host(upstream.base_url)})"

    def stream(self, payload: dict[str, Any]) -> SdkStream:
        return SdkStream(self._client, payload)


class SdkClients:
    """`UpstreamClients`' interface as the dispatcher uses it, with SDK clients."""

    def __init__(self, settings: BrokerSettings) -> None:
        self._settings = settings
        self._clients: dict[str, SdkClient] = {}

    def client(self, upstream: Upstream) -> SdkClient:
        if upstream.name not in self._clients:
            self._clients[upstream.name] = SdkClient(upstream, self._settings)
        return self._clients[upstream.name]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client._client.close()


# --------------------------------------------------------------- the broker


def broker_environ(upstream: str) -> dict[str, str]:
    return {
        "SWITCHBOARD_TENANT_KEYS": f"{TENANT}={hash_key('sk-sb-bench-tenant-key')}",
        "SWITCHBOARD_BROKER_UPSTREAM_URL": upstream,
        "SWITCHBOARD_BROKER_MAX_CONCURRENT": "1024",
        "SWITCHBOARD_BROKER_MAX_QUEUED_PER_TENANT": "1024",
        "SWITCHBOARD_BROKER_METRICS_LISTEN": "off",
        # Under callgrind, turning instrumentation on stalls the process for
        # seconds; a connect timeout then would fail the warm-up.
        "SWITCHBOARD_BROKER_CONNECT_TIMEOUT_S": "120",
    }


async def serve(client: str, upstream: str) -> None:
    """The broker under test, until stdin closes; `client` picks its upstream client.

    Each stdin line `read STREAMS TOKENS DELAY_MS` reads that many streams from
    the upstream at once with the client alone (no gRPC, no broker) and answers
    `read TOKENS` (the chunks read).
    """
    environ = broker_environ(upstream)
    settings = BrokerSettings.from_environ(environ)
    configure_logging("broker", "WARNING")
    async with running(settings, load_tenants(environ)) as servicer:
        clients: SdkClients | UpstreamClients = servicer.dispatcher.clients
        if client == "sdk":
            clients = servicer.dispatcher.clients = SdkClients(settings)  # type: ignore[assignment]
        server = grpc.aio.server()
        servicer.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"broker listening on 127.0.0.1:{port}", flush=True)
        loop = asyncio.get_running_loop()
        target = Upstream("default", upstream)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            streams, tokens, delay_ms = (int(word) for word in line.split()[1:])
            read = await read_streams(clients.client(target), streams, tokens, delay_ms)
            print(f"read {read}", flush=True)
        await server.stop(None)
        if client == "sdk":
            await clients.aclose()


async def read_streams(
    client: SdkClient | UpstreamClient, streams: int, tokens: int, delay_ms: int
) -> int:
    """Read `streams` replies of `tokens` tokens at once; the chunks read."""
    behaviour = f'{{"tokens": {tokens}, "token_delay_ms": {delay_ms}}}'
    payload = {
        "model": "sim-small",
        "messages": [{"role": "user", "content": f"go [[sim {behaviour}]]"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one() -> int:
        chunks = 0
        async with client.stream(payload) as stream:
            async for _ in stream:
                chunks += 1
        return chunks

    return sum(await asyncio.gather(*(one() for _ in range(streams))))


# --------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    tokens: int
    delay_ms: int

    def request(self, number: int) -> broker_pb2.GenerateRequest:
        behaviour = f'{{"tokens": {self.tokens}, "token_delay_ms": {self.delay_ms}}}'
        part = common_pb2.ContentPart(
            type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text=f"go {number} [[sim {behaviour}]]"
        )
        item = common_pb2.Item(
            type=common_pb2.ITEM_TYPE_MESSAGE, role=common_pb2.ROLE_USER, content=[part]
        )
        return broker_pb2.GenerateRequest(
            tenant_id=TENANT,
            session_id=f"sess_{number}",
            response_id=f"resp_{number}",
            model="sim-small",
            context=session_pb2.Context(items=[item], estimated_tokens=10),
        )


@dataclass
class Result:
    tokens: int
    cpu_s: float
    instructions: int | None


@dataclass(frozen=True)
class Side:
    """One of the two brokers compared: its label, upstream client and source tree.

    `source` None: this tree; else the root of an exported commit, whose
    `services` and own `tools.bench_upstream serve` are run.
    """

    label: str
    client: str
    source: Path | None = None


def exported(ref: str, into: Path) -> Path:
    """The source tree of git commit `ref`, exported under `into`."""
    root = into / "baseline"
    root.mkdir()
    archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


class Broker:
    """One broker process under test, pinned, optionally under callgrind."""

    def __init__(self, side: Side, upstream: str, core: int, callgrind: Path | None) -> None:
        client = side.client
        command = [sys.executable, "-m", "tools.bench_upstream", "serve"]
        command += ["--client", client, "--upstream", upstream]
        env = None
        if side.source is not None:
            # The exported tree's packages before this tree's (installed as editable).
            path = f"{side.source / 'services'}{os.pathsep}{side.source}"
            env = {**os.environ, "PYTHONPATH": path}
        if callgrind is not None:
            # Not instrumented until `callgrind_control -i on`: start-up stays fast.
            command = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={callgrind / side.label}.out",
                f"--log-file={callgrind / side.label}.log",
                *command,
            ]
        self.callgrind = callgrind
        self.label = side.label
        self.process = subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=side.source,
            env=env,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("broker listening on "):
            raise RuntimeError(f"the {side.label} broker did not start: {line!r}")
        self.address = line.split()[-1]
        self._dumps = 0

    def control(self, *flags: str) -> None:
        if self.callgrind is not None:
            subprocess.run(
                ["callgrind_control", *flags, str(self.process.pid)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def instructions(self) -> int | None:
        """Instructions since the last zeroing (dumps and zeroes the counters)."""
        if self.callgrind is None:
            return None
        self.control("-d")
        self._dumps += 1
        dump = self.callgrind / f"{self.label}.out.{self._dumps}"
        for line in dump.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {dump}")

    def read(self, scenario: Scenario) -> int:
        """Have the process read `scenario`'s streams with its client alone; the chunks."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"read {scenario.streams} {scenario.tokens} {scenario.delay_ms}\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline().split()[1])

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


async def load_stream(address: str, scenario: Scenario, first: int) -> int:
    """Run `scenario`'s streams at once over one `Stream` call; the text deltas received.

    The calls go in one `StreamRequests` message (the protocol since 258cfab: a
    baseline older than that does not speak it)."""
    batch = broker_pb2.StreamRequests()
    for number in range(scenario.streams):
        generate = scenario.request(first + number)
        batch.requests.add(call=number, generate=generate)
    done = asyncio.Event()

    async def sent() -> AsyncIterator[broker_pb2.StreamRequests]:
        yield batch
        await done.wait()

    deltas, running = 0, scenario.streams
    async with grpc.aio.insecure_channel(address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        async for response in stub.Stream(sent()):
            for entry in response.calls:
                if entry.HasField("failure"):
                    raise RuntimeError(f"call {entry.call} failed: {entry.failure.message}")
                for event in entry.events:
                    kind = event.WhichOneof("event")
                    if kind == "text_delta":
                        deltas += 1
                    elif kind == "finished":
                        running -= 1
            if not running:
                done.set()  # the stream ends once its calls have
    return deltas


async def load(address: str, scenario: Scenario, first: int) -> int:
    """Run `scenario`'s streams at once, a Generate call each; the text deltas received."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)

        async def one(number: int) -> int:
            deltas = 0
            async for event in stub.Generate(scenario.request(number)):
                if event.WhichOneof("event") == "text_delta":
                    deltas += 1
            return deltas

        counts = await asyncio.gather(*(one(first + i) for i in range(scenario.streams)))
    return sum(counts)


async def measure(broker: Broker, scenarios: list[Scenario]) -> dict[str, Result]:
    """Each scenario through the broker (gRPC load) and by its upstream client alone."""
    warm_up = Scenario("warm-up", 4, 32, 0)
    # Warm before and after instrumentation is on: connections pooled, code translated.
    await load(broker.address, warm_up, 0)
    broker.control("-i", "on")
    await load(broker.address, warm_up, 10_000)
    await load_stream(broker.address, warm_up, 20_000)
    await asyncio.to_thread(broker.read, warm_up)
    results: dict[str, Result] = {}
    for index, scenario in enumerate(scenarios, start=1):
        for path in PATHS:
            broker.control("-z")
            before = cpu_seconds(broker.process.pid)
            if path == "stream":
                # Counted as the text deltas sent: merged deltas count once.
                await load_stream(broker.address, scenario, index * 100_000)
                tokens = scenario.streams * scenario.tokens
            elif path == "broker":
                tokens = await load(broker.address, scenario, index * 100_000 + 50_000)
            else:
                await asyncio.to_thread(broker.read, scenario)
                tokens = scenario.streams * scenario.tokens
            cpu = cpu_seconds(broker.process.pid) - before
            results[f"{scenario.name} {path}"] = Result(tokens, cpu, broker.instructions())
    return results


def start_simulator(core: int) -> tuple[subprocess.Popen[str], str]:
    command = ["taskset", "-c", str(core), sys.executable, "-m", "tools.simulator"]
    command += ["--port", "0", "--ttft-ms", "0", "--token-delay-ms", "0"]
    sim = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    line = sim.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"the simulator did not start: {line!r}")
    return sim, line.split()[-1] + "/v1"


def ratio(new: float | None, old: float | None) -> str:
    if new is None or old is None or not old:
        return "-"
    return f"{new / old:.2f} ({(new / old - 1) * 100:+.0f}%)"


def report(
    scenarios: list[Scenario], sides: list[Side], results: dict[str, dict[str, Result]]
) -> None:
    """One line per scenario, path and side, then the ratio of the second side to the first."""
    width = max(8, *(len(side.label) for side in sides))
    print(
        f"{'scenario':<30} {'path':<7} {'broker':<{width}} {'CPU us/token':>13} {'instr/token':>14}"
    )
    for scenario in scenarios:
        label = f"{scenario.name}: {scenario.streams} x {scenario.tokens} @ {scenario.delay_ms} ms"
        for path in PATHS:
            per: list[tuple[float, float | None]] = []
            for side in sides:
                result = results[side.label][f"{scenario.name} {path}"]
                cpu = result.cpu_s / result.tokens * 1e6
                count = result.instructions
                instr = None if count is None else count / result.tokens
                per.append((cpu, instr))
                instr_text = "-" if instr is None else f"{instr:,.0f}"
                print(f"{label:<30} {path:<7} {side.label:<{width}} {cpu:>13.1f} {instr_text:>14}")
                label = ""
            (cpu_old, instr_old), (cpu_new, instr_new) = per
            print(
                f"{'':<30} {path:<7} {'ratio':<{width}} {ratio(cpu_new, cpu_old):>13} "
                f"{ratio(instr_new, instr_old):>14}"
            )


async def run(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.client_core})
    tools = ("valgrind", "callgrind_control")
    if args.callgrind and not all(shutil.which(tool) for tool in tools):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-upstream-"))
    callgrind = scratch if args.callgrind else None
    if args.against:
        baseline = Side(args.against, "aiohttp", exported(args.against, scratch))
    else:
        baseline = Side("sdk", "sdk")
    sides = [baseline, Side("aiohttp", "aiohttp")]
    scenarios = [
        Scenario("paced", args.paced_streams, args.paced_tokens, args.delay_ms),
        Scenario("burst", args.burst_streams, args.burst_tokens, 0),
    ]
    sim, upstream = start_simulator(args.client_core)
    results: dict[str, dict[str, Result]] = {}
    try:
        for side in sides:
            started = time.monotonic()
            broker = Broker(side, upstream, args.sut_core, callgrind)
            try:
                results[side.label] = await measure(broker, scenarios)
            finally:
                broker.stop()
            elapsed = time.monotonic() - started
            print(f"# {side.label}: measured in {elapsed:.0f} s", file=sys.stderr)
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    note = "callgrind on: CPU times are valgrind's, compare instructions" if callgrind else ""
    print(f"broker CPU per token, {baseline.label} (baseline) vs aiohttp; {note}".rstrip("; "))
    report(scenarios, sides, results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command")
    served = sub.add_parser("serve", help="the broker under test (started by the benchmark)")
    served.add_argument("--client", choices=CLIENTS, required=True)
    served.add_argument("--upstream", required=True)
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument(
        "--against", metavar="REF", help="baseline: the broker of this git commit, not the SDK"
    )
    parser.add_argument("--paced-streams", type=int, default=50)
    parser.add_argument("--paced-tokens", type=int, default=128)
    parser.add_argument("--delay-ms", type=int, default=20)
    parser.add_argument("--burst-streams", type=int, default=4)
    parser.add_argument("--burst-tokens", type=int, default=2000)
    parser.add_argument("--sut-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        import uvloop

        uvloop.run(serve(args.client, args.upstream))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
