"""What the toolexec tests share: tools files, servicers, gRPC stubs, the real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from switchboard import rpc
from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.catalog import Catalog
from switchboard.toolexec.results import ResultStore
from switchboard.toolexec.service import ToolExecServicer
from switchboard.toolexec.tools_config import ToolsConfig, parse_tools_config
from switchboard.toolexec.webhooks import WebhookClient
from switchboard.v1 import common_pb2, toolexec_pb2, toolexec_pb2_grpc
from tests.toolexec.receiver import SECRET

ROOT = Path(__file__).resolve().parents[2]
T = toolexec_pb2
C = common_pb2
Stub = Any  # toolexec_pb2_grpc.ToolExecServiceAsyncStub exists only for type checkers

BUILTINS = builtin_registry().names()
ENVIRON = {"ACME_SECRET": SECRET, "GLOBEX_SECRET": "globex-secret-0123456789"}
ORDER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku"],
            },
        },
    },
    "required": ["order_id"],
    "additionalProperties": False,
}


def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    """One `webhooks:` entry of the acme tenant's kind."""
    return {
        "name": name,
        "description": f"test webhook {name}",
        "parameters": ORDER_PARAMETERS,
        "url": url,
        "secret_env": "ACME_SECRET",
        **extra,
    }


def config(
    acme_webhooks: list[dict[str, Any]],
    *,
    allow: tuple[str, ...] = ("127.0.0.1",),
    environ: dict[str, str] | None = None,
    **tenants: Any,
) -> ToolsConfig:
    """A checked ToolsConfig: acme with every built-in and `acme_webhooks`, plus `tenants`."""
    data = {
        "allow_private_hosts": list(allow),
        "tenants": {
            "acme": {"builtins": sorted(BUILTINS), "webhooks": acme_webhooks},
            **tenants,
        },
    }
    return parse_tools_config(data, environ=environ or ENVIRON, builtin_names=BUILTINS)


def servicer(
    tools: ToolsConfig, client: WebhookClient, results: ResultStore | None = None
) -> ToolExecServicer:
    return ToolExecServicer(Catalog.build(builtin_registry(), tools, client), results=results)


@asynccontextmanager
async def grpc_stub(servicer: ToolExecServicer) -> AsyncIterator[Stub]:
    """A real grpc.aio server on 127.0.0.1:0 serving `servicer`, and a stub to it."""
    server = grpc.aio.server()
    toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield toolexec_pb2_grpc.ToolExecServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def execute(
    stub: Stub, name: str, arguments: Any = None, *, tenant: str = "acme", call_id: str = ""
) -> toolexec_pb2.ExecuteResponse:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    request = T.ExecuteRequest(
        tenant_id=tenant, session_id="sess_1", call_id=call_id, name=name, arguments=text
    )
    response: toolexec_pb2.ExecuteResponse = await stub.Execute(request, timeout=15)
    return response


async def listed(stub: Stub, tenant: str) -> list[str]:
    reply = await stub.ListTools(T.ListToolsRequest(tenant_id=tenant))
    return [tool.name for tool in reply.tools]


def clean_environ(**overrides: str) -> dict[str, str]:
    """os.environ without any SWITCHBOARD_ setting, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(overrides)
    return env


def run_toolexec(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m switchboard.toolexec` with `env`, for a process expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "switchboard.toolexec"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class Process:
    """A toolexec process started by `toolexec_process`; `returncode` and
    `stderr` are set once it has stopped."""

    stub: Stub
    returncode: int | None = None
    stderr: str = ""


@asynccontextmanager
async def toolexec_process(env: dict[str, str], port: int) -> AsyncIterator[Process]:
    """`python -m switchboard.toolexec` with `env`, listening on `port`, once it is healthy.

    On exit it gets SIGTERM and is waited for; its exit status and log are then
    on the yielded `Process`.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard.toolexec",
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    channel = rpc.channel(f"127.0.0.1:{port}")
    running = Process(toolexec_pb2_grpc.ToolExecServiceStub(channel))
    try:
        deadline = time.monotonic() + 20
        while not await rpc.check_health(channel, timeout_s=0.5):
            assert time.monotonic() < deadline, "toolexec did not become healthy"
            await asyncio.sleep(0.1)
        yield running
    finally:
        await channel.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
        running.returncode, running.stderr = process.returncode, stderr.decode()
