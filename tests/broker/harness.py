"""What the broker tests share: a real broker on 127.0.0.1:0, requests, results.

`serving(environ)` builds the broker from an environment the way
`python -m switchboard.broker` does (`BrokerSettings`, `load_tenants`,
`service.running`) and serves it with a real grpc.aio server; the tests call
it through a real stub.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import grpc
import pytest

from switchboard.broker.service import BrokerServicer, running
from switchboard.config import BrokerSettings
from switchboard.tenancy import LiveTenants, hash_key, load_tenants
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2, session_pb2

B = broker_pb2
C = common_pb2
Stub = Any  # broker_pb2_grpc.BrokerServiceAsyncStub

# The development tenant of `dev_env`, as `make run` configures one.
DEV_TENANT = "t1"
DEV_UPSTREAM_KEY = "sk-test-broker-key"


def dev_env(base_url: str, **env: str) -> dict[str, str]:
    """The development setup of `make run`: tenant keys and the broker's upstream variables."""
    return {
        "SWITCHBOARD_TENANT_KEYS": f"{DEV_TENANT}={hash_key('sk-sb-dev-tenant-key')}",
        "SWITCHBOARD_BROKER_UPSTREAM_URL": base_url,
        "SWITCHBOARD_BROKER_UPSTREAM_API_KEY": DEV_UPSTREAM_KEY,
        **env,
    }


class Served(NamedTuple):
    stub: Stub
    servicer: BrokerServicer
    tenants: LiveTenants


@asynccontextmanager
async def serving(environ: dict[str, str], *, reload_s: float = 1.0) -> AsyncIterator[Served]:
    """A broker on 127.0.0.1:0 built from `environ` (see `serving_channel`)."""
    async with serving_channel(environ, reload_s=reload_s) as (served, _channel):
        yield served


@asynccontextmanager
async def serving_channel(
    environ: dict[str, str], *, reload_s: float = 1.0
) -> AsyncIterator[tuple[Served, grpc.aio.Channel]]:
    """A broker on 127.0.0.1:0 built from `environ`, a stub for it, and its tenants.

    The tenants file, when `environ` names one, is checked every `reload_s`.
    Everything is closed on exit, the server before the upstream clients.
    """
    settings = BrokerSettings.from_environ(environ)
    tenants = load_tenants(environ, interval_s=reload_s)
    async with running(settings, tenants) as servicer:
        server = grpc.aio.server()
        servicer.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = broker_pb2_grpc.BrokerServiceStub(channel)
                yield Served(stub, servicer, tenants), channel
        finally:
            await server.stop(None)


def user(text: str) -> C.Item:
    part = C.ContentPart(type=C.CONTENT_TYPE_INPUT_TEXT, text=text)
    return C.Item(type=C.ITEM_TYPE_MESSAGE, role=C.ROLE_USER, content=[part])


def assistant(text: str) -> C.Item:
    part = C.ContentPart(type=C.CONTENT_TYPE_OUTPUT_TEXT, text=text)
    return C.Item(type=C.ITEM_TYPE_MESSAGE, role=C.ROLE_ASSISTANT, content=[part])


_RESPONSE_NUMBERS = itertools.count(1)


def generate_request(*items: C.Item, **fields: Any) -> B.GenerateRequest:
    """A request of the development tenant, with a response id of its own.

    The broker holds each call under its tenant and response id, and a second
    call with the same ids replaces the first: concurrent calls need their own.
    """
    context = session_pb2.Context(items=list(items), estimated_tokens=50)
    fields.setdefault("model", "sim-small")
    fields.setdefault("tenant_id", DEV_TENANT)
    fields.setdefault("session_id", "sess_1")
    fields.setdefault("response_id", f"resp_{next(_RESPONSE_NUMBERS)}")
    return B.GenerateRequest(context=context, **fields)


def directive(**behaviour: Any) -> str:
    return f"[[sim {json.dumps(behaviour)}]]"


async def collect(stub: Stub, req: B.GenerateRequest) -> list[B.GenerateEvent]:
    return [event async for event in stub.Generate(req)]


def kinds(events: list[B.GenerateEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def text_of(events: list[B.GenerateEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")


async def rpc_error(stub: Stub, req: B.GenerateRequest) -> tuple[grpc.aio.AioRpcError, list[str]]:
    """The error a Generate call ends with, and the kinds of the events before it."""
    seen: list[str] = []

    async def consume() -> None:
        async for event in stub.Generate(req):
            seen.append(str(event.WhichOneof("event")))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await consume()
    return caught.value, seen


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or ()}


async def eventually(check: Callable[[], Awaitable[Any | None]], timeout_s: float = 2.0) -> Any:
    """The first non-None result of `check`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (found := await check()) is None:
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)
    return found


async def met(condition: bool) -> bool | None:
    """True when `condition` holds, else None: `eventually(lambda: met(x == 1))`."""
    return True if condition else None


class ManualContext:
    """Just enough of a grpc.aio ServicerContext to drive Generate by hand."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.metadata = metadata

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)
