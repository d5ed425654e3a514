"""Helpers of the webhook, config and Redis tests: tools files, servicers, gRPC stubs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.catalog import Catalog
from switchboard.toolexec.results import ResultStore
from switchboard.toolexec.service import ToolExecServicer
from switchboard.toolexec.tools_config import ToolsConfig, parse_tools_config
from switchboard.toolexec.webhooks import WebhookClient
from switchboard.v1 import common_pb2, toolexec_pb2, toolexec_pb2_grpc
from tests.toolexec.receiver import SECRET

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
