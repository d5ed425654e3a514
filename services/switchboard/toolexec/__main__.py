"""Run the toolexec service: `python -m switchboard.toolexec`.

Reads `ToolExecSettings` and, when `SWITCHBOARD_TOOLEXEC_TOOLS_FILE` is set,
the tools file; a bad setting or a bad file stops start-up with a one-line
message naming the variable or the key path, and exit code 2. Then it opens
the webhook client (one aiohttp session) and, when `SWITCHBOARD_REDIS_URL` is
set, the Redis client of the result store, serves gRPC with the standard
health service until SIGTERM/SIGINT, drains (`switchboard.rpc.serve`) and
closes both. With an OTLP endpoint set (`switchboard.telemetry.tracing`) it exports
spans, and flushes them at exit.

Health stays SERVING while Redis is away: calls without a call_id and every
refusal still work, and calls that need the store are refused one by one
with a clear message; marking the whole service unready would instead fail
every tool call of every tenant through the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from typing import Any, NoReturn

import grpc
from redis.asyncio.connection import parse_url

from switchboard import rpc
from switchboard.config import ConfigError, ToolExecSettings
from switchboard.redis_client import AnyRedis, any_client, warm_up
from switchboard.telemetry.logs import configure_logging
from switchboard.telemetry.tracing import configure_tracing
from switchboard.toolexec.builtins import BUILTIN_TOOLS, builtin_registry
from switchboard.toolexec.catalog import (
    Catalog,
    CatalogSource,
    LiveCatalog,
    load_tenants_tools,
)
from switchboard.toolexec.mcp_client import McpClient
from switchboard.toolexec.mcp_tools import McpTools
from switchboard.toolexec.results import MemoryResultStore, RedisResultStore, ResultStore
from switchboard.toolexec.service import ToolExecServicer
from switchboard.toolexec.tools_config import ToolsConfig, load_tools_file
from switchboard.toolexec.webhooks import WebhookClient
from switchboard.v1 import toolexec_pb2_grpc

SERVICE_NAME = "switchboard.v1.ToolExecService"

log = logging.getLogger(__name__)


async def run(
    settings: ToolExecSettings,
    *,
    tools_config: ToolsConfig | None = None,
    environ: Mapping[str, str] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until told to stop; every resource lives in this loop.

    Args:
        settings: the validated settings.
        tools_config: the tools file as loaded at start (loaded here when None
            and `settings.tools_file` is set).
        environ: where webhook secrets are read on reloads; `os.environ` by default.
        stop: set it to stop serving (SIGTERM/SIGINT also do).
    """
    environ = os.environ if environ is None else environ
    registry = builtin_registry()
    webhooks = WebhookClient()
    redis: AnyRedis | None = None
    try:
        if settings.redis_url is not None:
            redis = any_client(settings.redis_url.reveal(), cluster=settings.redis_cluster)
            await warm_up(redis)
        tools: CatalogSource = Catalog(registry)
        source = settings.tools_file or settings.tenants_file
        if source is not None:
            tools = LiveCatalog(
                source,
                registry=registry,
                client=webhooks,
                environ=environ,
                initial=tools_config,
                tenants_file=settings.tools_file is None,
            )
        results: ResultStore = MemoryResultStore()
        if redis is not None:
            store = RedisResultStore(redis, ttl_s=settings.result_ttl_s)
            if not await store.ping():
                log.warning("redis is not answering; calls with a call_id are refused until it is")
            results = store
        # One private-address rule (and `allow_private_hosts`) for webhooks and MCP servers.
        mcp = McpTools(McpClient(webhooks.guard, environ))
        servicer = ToolExecServicer(
            tools, results=results, max_output_bytes=settings.max_output_bytes, mcp=mcp
        )

        def register(server: grpc.aio.Server) -> None:
            toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

        metrics = None
        if settings.metrics_listen:
            metrics = (settings.metrics_listen, servicer.metrics.registry)
        await rpc.serve(SERVICE_NAME, settings.listen, register, stop=stop, metrics=metrics)
    finally:
        await webhooks.close()
        if redis is not None:
            await redis.aclose()


def main() -> None:
    try:
        settings = ToolExecSettings.from_environ()
        if settings.redis_url is not None:
            # Parse the URL now so a malformed one fails start-up, not the first call.
            parse_url(settings.redis_url.reveal())
        tools_config = None
        names = {tool.name for tool in BUILTIN_TOOLS}
        if settings.tools_file is not None:
            tools_config = load_tools_file(
                settings.tools_file, environ=os.environ, builtin_names=names
            )
        elif settings.tenants_file is not None:
            tools_config = load_tenants_tools(settings.tenants_file, os.environ, names)
        traces = configure_tracing("toolexec")
    except ConfigError as exc:
        _refuse(str(exc))
    except ValueError as exc:
        # redis-py's messages name the bad part, never the URL (it may hold a password).
        _refuse(f"SWITCHBOARD_REDIS_URL: {exc}")
    try:
        configure_logging("toolexec", settings.log_level)
    except ValueError:
        # config.py takes SWITCHBOARD_LOG_LEVEL as any string; logging refuses unknown levels.
        _refuse(
            "SWITCHBOARD_LOG_LEVEL must be a log level "
            f"(DEBUG, INFO, WARNING, ERROR), got {settings.log_level!r}"
        )
    try:
        _run_loop(run(settings, tools_config=tools_config))
    finally:
        if traces is not None:
            traces.shutdown()


def _refuse(message: str) -> NoReturn:
    print(f"toolexec: configuration error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def _run_loop(main_coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional here
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    main()
