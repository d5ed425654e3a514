"""What one Redis call costs the calling service in CPU: the client that
`switchboard.redis_client.redis_client` builds against the one it built before
(redis-py's `BlockingConnectionPool` with per-command timeouts), in the same run.

A real Redis is pinned to one core (`--redis-core`), this process (the client)
to another (`--client-core`). Two workloads, the shapes the services send:

- `script`: `--tasks` concurrent callers, each running one small Lua script
  (EVALSHA) after another: the gateway's limits and usage ledger;
- `pipeline`: `--tasks` concurrent callers, each sending a pipeline of
  `--batch` EVALSHAs: the session service's event-log appends.

The variants alternate, round after round. It prints, per variant and round,
this process's CPU time per call (from /proc), then the ratios of the current
client to the earlier one (medians over the rounds).

    python -m tools.bench_redis_calls [--tasks 64] [--calls 3000] [--batch 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from redis._parsers import _AsyncRESP3Parser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from switchboard.redis_client import redis_client
from tools.redis_server import RedisServer

# A script of the size of the limits' and the event log's: a few keys, a few writes.
SCRIPT = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return n
"""


def earlier_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> Redis:
    """The client `redis_client` built before this benchmark was written (redis-py's
    own pure-Python parser: hiredis was not installed)."""
    pool = BlockingConnectionPool.from_url(
        url,
        parser_class=_AsyncRESP3Parser,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return Redis.from_pool(pool)


async def scripts(client: Redis, sha: str, task: int, calls: int) -> None:
    key = f"bench:{{{task % 8}}}:usage"
    for n in range(calls):
        await client.evalsha(sha, 1, key, f"field{n % 4}", 1, 60_000)


async def pipelines(client: Redis, sha: str, task: int, calls: int, batch: int) -> None:
    for n in range(calls):
        async with client.pipeline(transaction=False) as pipe:
            for b in range(batch):
                pipe.evalsha(sha, 1, f"bench:{{{task}:{b}}}:events", "seq", n, 60_000)
            await pipe.execute()


async def run(
    make: Callable[[str], Redis],
    url: str,
    tasks: int,
    per_task: int,
    body: Callable[..., Awaitable[None]],
) -> float:
    """CPU seconds of this process per call of `body` over `tasks` concurrent callers."""
    client = make(url)
    try:
        sha = await client.script_load(SCRIPT)
        # Warm the pool up to its working size first: connections are made once.
        await asyncio.gather(*(body(client, sha, t, 2) for t in range(tasks)))
        start = time.process_time()
        await asyncio.gather(*(body(client, sha, t, per_task) for t in range(tasks)))
        return (time.process_time() - start) / (tasks * per_task)
    finally:
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    with RedisServer() as server:
        if server.pid is not None:
            os.sched_setaffinity(server.pid, {args.redis_core})
        os.sched_setaffinity(0, {args.client_core})
        per_task = max(1, args.calls // args.tasks)
        variants: dict[str, Callable[[str], Redis]] = {
            "earlier": earlier_client,
            "current": redis_client,
        }
        workloads: dict[str, Callable[..., Awaitable[None]]] = {
            "script": scripts,
            f"pipeline of {args.batch}": lambda c, s, t, n: pipelines(c, s, t, n, args.batch),
        }
        print(
            f"Redis on core {args.redis_core}, client on core {args.client_core}; "
            f"{args.tasks} concurrent callers, {per_task} calls each per round"
        )
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for workload, body in workloads.items():
                for variant, make in variants.items():
                    cost = await run(make, server.url, args.tasks, per_task, body)
                    results.setdefault((workload, variant), []).append(cost)
        for (workload, variant), costs in results.items():
            shown = "  ".join(f"{c * 1e6:7.1f}" for c in costs)
            print(f"{workload:>14} {variant:>8}: client CPU µs per call {shown}")
        for workload in workloads:
            earlier = statistics.median(results[(workload, "earlier")])
            current = statistics.median(results[(workload, "current")])
            print(
                f"{workload:>14} current / earlier, client CPU per call: x{current / earlier:.2f}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--calls", type=int, default=6400, help="calls per variant and round")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    return parser.parse_args()


if __name__ == "__main__":
    import uvloop  # the services run on uvloop

    uvloop.run(main(parse_args()))
