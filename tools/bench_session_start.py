"""What a response's start costs the session service: the client's item stored,
then the context read, as two RPCs (`AppendItem`, then `BuildContext`) against
one (`AppendItem` with `with_context`, docs/session.md), in the same run.

A real session service (`python -m switchboard.session`) and a real Redis are
pinned to one core (`--sut-core`), the client to another (`--client-core`).
Each round gives every variant fresh sessions (`--sessions` of them, served
concurrently) and stores `--items` items in each, one response start per item;
the variants alternate, round after round. It prints, per variant and round,
the CPU time of the session service and of Redis per response start (from
/proc), the latency p50 of a start and starts per second, then the ratios of
the one-RPC variant to the two-RPC one (medians over the rounds).

    python -m tools.bench_session_start [--sessions 50] [--items 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import grpc

from switchboard.v1 import common_pb2, session_pb2, session_pb2_grpc
from tools.bench_load import cpu_seconds
from tools.redis_server import RedisServer, free_port

TENANT = "bench"
Start = Callable[[session_pb2_grpc.SessionServiceStub, str, int], Awaitable[session_pb2.Context]]


def user_item(n: int) -> common_pb2.Item:
    return common_pb2.Item(
        type=common_pb2.ITEM_TYPE_MESSAGE,
        role=common_pb2.ROLE_USER,
        content=[
            common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text=f"hello {n}")
        ],
    )


async def two_rpcs(
    stub: session_pb2_grpc.SessionServiceStub, session_id: str, n: int
) -> session_pb2.Context:
    stored = session_pb2.AppendItemRequest(
        tenant_id=TENANT, session_id=session_id, item=user_item(n)
    )
    await stub.AppendItem(stored)
    built = session_pb2.BuildContextRequest(tenant_id=TENANT, session_id=session_id)
    context: session_pb2.Context = await stub.BuildContext(built)
    return context


async def one_rpc(
    stub: session_pb2_grpc.SessionServiceStub, session_id: str, n: int
) -> session_pb2.Context:
    request = session_pb2.AppendItemRequest(
        tenant_id=TENANT, session_id=session_id, item=user_item(n), with_context=True
    )
    reply: session_pb2.AppendItemResponse = await stub.AppendItem(request)
    return reply.context


VARIANTS: dict[str, Start] = {
    "AppendItem + BuildContext": two_rpcs,
    "AppendItem with_context": one_rpc,
}


async def new_sessions(stub: session_pb2_grpc.SessionServiceStub, count: int) -> list[str]:
    config = session_pb2.SessionConfig(instructions="Be brief.")
    request = session_pb2.CreateSessionRequest(tenant_id=TENANT, config=config)
    return [(await stub.CreateSession(request, wait_for_ready=True)).id for _ in range(count)]


async def measure(
    stub: session_pb2_grpc.SessionServiceStub,
    start: Start,
    pids: list[int],
    args: argparse.Namespace,
) -> tuple[float, float, float, float]:
    """(session µs, Redis µs, latency p50 ms, starts/s) of one round of a variant."""
    sessions = await new_sessions(stub, args.sessions)
    latencies: list[float] = []

    async def one_session(session_id: str) -> None:
        for n in range(args.items):
            began = time.perf_counter()
            context = await start(stub, session_id, n)
            latencies.append(time.perf_counter() - began)
            assert len(context.items) == n + 1

    cpu_before = [cpu_seconds(pid) for pid in pids]
    began = time.perf_counter()
    await asyncio.gather(*(one_session(session_id) for session_id in sessions))
    wall_s = time.perf_counter() - began
    count = len(latencies)
    session_s, redis_s = (
        cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)
    )
    return (
        session_s / count * 1e6,
        redis_s / count * 1e6,
        statistics.median(latencies) * 1e3,
        count / wall_s,
    )


async def run(args: argparse.Namespace, port: int, pids: list[int]) -> None:
    """Alternate the variants against the session service at `port`; print what they cost."""
    for pid in pids:
        os.sched_setaffinity(pid, {args.sut_core})
    os.sched_setaffinity(0, {args.client_core})
    print(
        f"session service and Redis on core {args.sut_core}, client on core "
        f"{args.client_core}; {args.sessions} sessions x {args.items} starts per round"
    )
    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in VARIANTS}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for _ in range(args.rounds):
            for name, start in VARIANTS.items():
                rows[name].append(await measure(stub, start, pids, args))
    for name, measured in rows.items():
        print(f"{name}: per response start, session µs / Redis µs / p50 ms / starts/s")
        for session_us, redis_us, p50_ms, per_s in measured:
            print(f"  {session_us:8.0f} {redis_us:8.0f} {p50_ms:8.1f} {per_s:8.0f}")
    two, one = (rows[name] for name in VARIANTS)
    for label, index in (("session CPU", 0), ("Redis CPU", 1), ("latency p50", 2), ("starts/s", 3)):
        ratio = statistics.median(o[index] for o in one) / statistics.median(t[index] for t in two)
        print(f"with_context / two RPCs, {label}: x{ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="sessions served concurrently")
    parser.add_argument("--items", type=int, default=20, help="response starts per session")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sut-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    args = parser.parse_args()
    redis = RedisServer()
    redis.start()
    port = free_port()
    env = {
        **os.environ,
        "SWITCHBOARD_REDIS_URL": redis.url,
        "SWITCHBOARD_SESSION_LISTEN": f"127.0.0.1:{port}",
        "SWITCHBOARD_SESSION_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "switchboard.session"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert redis.pid is not None
        asyncio.run(run(args, port, [service.pid, redis.pid]))
    finally:
        service.terminate()
        service.wait()
        redis.close()


if __name__ == "__main__":
    main()
