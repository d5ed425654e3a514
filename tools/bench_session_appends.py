"""What a streamed response costs the session service and Redis: the calls the
gateway makes for one Realtime text response, against the session service of
another git commit (`--against`, default `main`) in the same run.

Per response and session, as the gateway sends them (gateway/turns.py,
gateway/eventlog.py): the client's item stored with its context (`AppendItem`
`with_context`), the appends of `conversation.item.created`, of the events
that open the response, of the broker note, of one append per delta
(`--tokens` of them), of the events that end it, and the output's `AppendItem`.
The appends of all sessions at one step go out in `AppendEventsBatch` calls of
`--batch` appends each, up to four of them in flight (the gateway's
`EventRecorder`); `--sessions` sessions stream side by side, each step for all
of them before the next.

Two session services (this tree's and the exported commit's, each `python -m
switchboard.session`) and one Redis are pinned to one core (`--sut-core`), this
client to another (`--client-core`); the two services serve alternately, round
after round, each with fresh sessions. It prints, per service and round, the
CPU time of the service and of Redis per delta (from /proc; a delta is one
token here), then this tree's over the other's (medians over the rounds).

    python -m tools.bench_session_appends [--against main] [--sessions 200]
        [--tokens 128] [--batch 25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import orjson

from switchboard.v1 import common_pb2, session_pb2, session_pb2_grpc
from tools.bench_load import cpu_seconds
from tools.bench_upstream import exported
from tools.redis_server import RedisServer, free_port

TENANT = "bench"
LEASE_MS = 10_000
IN_FLIGHT = 4


def event(kind: str, n: int, **fields: object) -> session_pb2.SessionEvent:
    """One server event as the gateway records it: numbered by the gateway."""
    event_id = f"event_bench{n}"
    payload = orjson.dumps({"type": kind, "event_id": event_id, **fields})
    return session_pb2.SessionEvent(seq=n, event_id=event_id, payload=payload)


class Response:
    """The session calls of one response in one session."""

    def __init__(self, session_id: str, holder: str, number: int) -> None:
        self.session_id = session_id
        self.holder = holder
        self.response_id = f"resp_bench{number}"
        self.item_id = f"item_out{number}"
        self.seq = 0

    def append(self, *events: tuple[str, dict[str, object]]) -> session_pb2.AppendEventsRequest:
        request = session_pb2.AppendEventsRequest(
            tenant_id=TENANT, session_id=self.session_id, holder=self.holder, lease_ms=LEASE_MS
        )
        for kind, fields in events:
            self.seq += 1
            request.events.append(event(kind, self.seq, **fields))
        return request

    def user_item(self) -> session_pb2.AppendItemRequest:
        text = f"Tell me something, {self.response_id}."
        item = common_pb2.Item(
            type=common_pb2.ITEM_TYPE_MESSAGE,
            role=common_pb2.ROLE_USER,
            content=[common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text=text)],
        )
        return session_pb2.AppendItemRequest(
            tenant_id=TENANT, session_id=self.session_id, item=item, with_context=True
        )

    def output_item(self, tokens: int) -> session_pb2.AppendItemRequest:
        item = common_pb2.Item(
            id=self.item_id,
            type=common_pb2.ITEM_TYPE_MESSAGE,
            role=common_pb2.ROLE_ASSISTANT,
            content=[
                common_pb2.ContentPart(
                    type=common_pb2.CONTENT_TYPE_OUTPUT_TEXT, text=" word" * tokens
                )
            ],
        )
        return session_pb2.AppendItemRequest(
            tenant_id=TENANT, session_id=self.session_id, item=item
        )

    def steps(self, tokens: int) -> list[session_pb2.AppendEventsRequest]:
        """The appends of the response, in order (the items are stored apart)."""
        created = self.append(("conversation.item.created", {"item": {"id": "item_user"}}))
        ids = {"response_id": self.response_id, "item_id": self.item_id}
        part = {**ids, "output_index": 0, "content_index": 0}
        opened = self.append(
            ("response.created", {"response": {"id": self.response_id, "status": "in_progress"}}),
            ("response.output_item.added", {**ids, "output_index": 0}),
            ("response.content_part.added", part),
        )
        opened.open_response_id = self.response_id
        opened.open_response_seq = opened.events[0].seq
        noted = session_pb2.AppendEventsRequest(
            tenant_id=TENANT,
            session_id=self.session_id,
            holder=self.holder,
            lease_ms=LEASE_MS,
            broker_response_id=self.response_id,
            broker_address="127.0.0.1:50052",
        )
        deltas = [
            self.append(("response.output_text.delta", {**part, "delta": " word"}))
            for _ in range(tokens)
        ]
        done = self.append(
            ("response.output_text.done", {**part, "text": " word" * tokens}),
            ("response.content_part.done", part),
            ("response.output_item.done", {**ids, "output_index": 0}),
            ("response.done", {"response": {"id": self.response_id, "status": "completed"}}),
        )
        done.open_response_id = ""
        return [created, opened, noted, *deltas, done]


async def append_all(
    stub: session_pb2_grpc.SessionServiceStub,
    appends: list[session_pb2.AppendEventsRequest],
    batch: int,
) -> None:
    """The appends in batches of `batch`, at most `IN_FLIGHT` calls at a time."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(part: list[session_pb2.AppendEventsRequest]) -> None:
        async with slots:
            reply = await stub.AppendEventsBatch(session_pb2.AppendEventsBatchRequest(appends=part))
        failed = [r for r in reply.results if r.error_code]
        assert not failed, failed[0]

    await asyncio.gather(*(one(appends[i : i + batch]) for i in range(0, len(appends), batch)))


async def measure(
    stub: session_pb2_grpc.SessionServiceStub, pids: list[int], args: argparse.Namespace, n: int
) -> tuple[float, float, float]:
    """(service µs, Redis µs per delta, responses per second) of one round."""
    config = session_pb2.SessionConfig(instructions="Be brief.")
    created = [
        await stub.CreateSession(
            session_pb2.CreateSessionRequest(tenant_id=TENANT, config=config),
            wait_for_ready=True,
        )
        for _ in range(args.sessions)
    ]
    responses = [
        Response(s.id, f"conn_bench{i}", n * args.sessions + i) for i, s in enumerate(created)
    ]
    for r in responses:
        claim = session_pb2.ClaimSessionRequest(
            tenant_id=TENANT, session_id=r.session_id, holder=r.holder, lease_ms=LEASE_MS
        )
        assert (await stub.ClaimSession(claim)).claimed
    steps = [r.steps(args.tokens) for r in responses]
    before = [cpu_seconds(pid) for pid in pids]
    began = time.perf_counter()
    calls: list[Awaitable[object]] = [stub.AppendItem(r.user_item()) for r in responses]
    await asyncio.gather(*calls)
    for step in range(len(steps[0])):
        await append_all(stub, [s[step] for s in steps], args.batch)
    await asyncio.gather(*(stub.AppendItem(r.output_item(args.tokens)) for r in responses))
    wall_s = time.perf_counter() - began
    service_s, redis_s = (cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
    deltas = args.sessions * args.tokens
    return service_s / deltas * 1e6, redis_s / deltas * 1e6, args.sessions / wall_s


def start_service(redis_url: str, source: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "SWITCHBOARD_REDIS_URL": redis_url,
        "SWITCHBOARD_SESSION_LISTEN": f"127.0.0.1:{port}",
        "SWITCHBOARD_SESSION_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    if source is not None:
        env["PYTHONPATH"] = f"{source / 'services'}{os.pathsep}{source}"
    process = subprocess.Popen(
        [sys.executable, "-m", "switchboard.session"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, port


async def run(args: argparse.Namespace, services: dict[str, tuple[int, int]], redis: int) -> None:
    os.sched_setaffinity(0, {args.client_core})
    for pid in (redis, *(pid for pid, _ in services.values())):
        os.sched_setaffinity(pid, {args.sut_core})
    print(
        f"session services and Redis on core {args.sut_core}, client on core {args.client_core}; "
        f"{args.sessions} sessions x 1 response of {args.tokens} deltas per round, "
        f"{args.batch} appends per AppendEventsBatch"
    )
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in services}
    channels = {
        name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, (_, port) in services.items()
    }
    try:
        stubs = {name: session_pb2_grpc.SessionServiceStub(c) for name, c in channels.items()}
        for n in range(args.rounds):
            for name, (pid, _) in services.items():
                rows[name].append(await measure(stubs[name], [pid, redis], args, n))
    finally:
        for channel in channels.values():
            await channel.close()
    for name, measured in rows.items():
        print(f"{name}: per delta, session µs / Redis µs; responses/s")
        for service_us, redis_us, per_s in measured:
            print(f"  {service_us:8.1f} {redis_us:8.1f} {per_s:8.0f}")
    this, other = (rows[name] for name in services)
    for label, index in (("session CPU", 0), ("Redis CPU", 1), ("responses/s", 2)):
        ratio = statistics.median(t[index] for t in this) / statistics.median(
            o[index] for o in other
        )
        print(f"this tree / {args.against}, {label}: x{ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="main", help="git commit of the baseline service")
    parser.add_argument("--sessions", type=int, default=200, help="sessions streaming at once")
    parser.add_argument("--tokens", type=int, default=128, help="deltas per response")
    parser.add_argument("--batch", type=int, default=25, help="appends per AppendEventsBatch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sut-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, RedisServer() as redis:
        source = exported(args.against, Path(scratch))
        started = {
            "this tree": start_service(redis.url, None),
            args.against: start_service(redis.url, source),
        }
        try:
            assert redis.pid is not None
            services = {name: (p.pid, port) for name, (p, port) in started.items()}
            asyncio.run(run(args, services, redis.pid))
        finally:
            for process, _ in started.values():
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
