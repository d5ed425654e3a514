"""What the session tests share: items and events to store, a real gRPC server, the process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from switchboard import rpc
from switchboard.errors import SwitchboardError
from switchboard.session.service import SessionServicer
from switchboard.session.store import SessionStore
from switchboard.v1 import common_pb2, session_pb2

ROOT = Path(__file__).resolve().parents[2]
C = common_pb2
S = session_pb2
Stub = Any  # session_pb2_grpc.SessionServiceAsyncStub
# The session TTL of the `store` fixture.
TTL_S = 600


def message(item_id: str = "", text: str = "hi", role: int = C.ROLE_USER) -> C.Item:
    kind = C.CONTENT_TYPE_INPUT_TEXT if role == C.ROLE_USER else C.CONTENT_TYPE_OUTPUT_TEXT
    return C.Item(
        id=item_id,
        type=C.ITEM_TYPE_MESSAGE,
        role=role,
        content=[C.ContentPart(type=kind, text=text)],
    )


def event(event_id: str, seq: int = 0) -> S.SessionEvent:
    return S.SessionEvent(seq=seq, event_id=event_id, payload=f'{{"id":"{event_id}"}}'.encode())


async def append_events(
    store: SessionStore,
    tenant_id: str,
    session_id: str,
    events: Sequence[S.SessionEvent],
    *,
    holder: str = "",
    lease_ms: int = 0,
    open_response_id: str | None = None,
    open_response_seq: int = 0,
    broker: tuple[str, str] | None = None,
) -> int:
    """One append through `store.events.append_batch`: its last seq, or its error raised.

    `broker` is (response id, HOST:PORT); `open_response_id` None leaves the
    session's open response as it is.
    """
    request = S.AppendEventsRequest(
        tenant_id=tenant_id,
        session_id=session_id,
        events=events,
        holder=holder,
        lease_ms=lease_ms,
        open_response_seq=open_response_seq,
    )
    if open_response_id is not None:
        request.open_response_id = open_response_id
    if broker is not None:
        request.broker_response_id, request.broker_address = broker
    [outcome] = await store.events.append_batch([request])
    if isinstance(outcome, SwitchboardError):
        raise outcome
    return outcome


async def start_server(servicer: SessionServicer) -> tuple[grpc.aio.Server, int]:
    """A real grpc.aio server on 127.0.0.1:0 serving `servicer`, and its port."""
    server = grpc.aio.server()
    servicer.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or ()}


async def create(stub: Stub, tenant: str, **config: Any) -> S.Session:
    return await stub.CreateSession(
        S.CreateSessionRequest(tenant_id=tenant, config=S.SessionConfig(**config))
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def main_serving(process: subprocess.Popen[str], channel: grpc.aio.Channel) -> None:
    """Wait until `process` (from `run_main`) answers its health check: its start-up
    (imports, Redis, gRPC) may take many seconds on a loaded machine, so the bound is
    a generous 30 s; an exit fails at once."""
    deadline = time.monotonic() + 30.0
    while not await rpc.check_health(channel):
        assert process.poll() is None, "the session service exited"
        assert time.monotonic() < deadline, "the session service did not become healthy"
        await asyncio.sleep(0.05)


def run_main(env: dict[str, str], *, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`python -m switchboard.session` with `env` added to this process's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "switchboard.session"],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )
