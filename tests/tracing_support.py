"""What the tracing tests share: a real grpc.aio server and channel with the tracing
interceptors, and ways to pick spans out of what a test recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from switchboard import rpc
from switchboard.interceptors import TracingServerInterceptor
from switchboard.telemetry import tracing


@asynccontextmanager
async def served(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[grpc.aio.Channel]:
    """A real grpc.aio server with the tracing interceptor, and `rpc.channel()` to it."""
    assert tracing.enabled()  # so rpc.channel() installs the client interceptor
    server = grpc.aio.server(interceptors=[TracingServerInterceptor()])
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with rpc.channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def one(finished: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    (found,) = [span for span in finished if span.name == name and span.kind == kind]
    return found


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


async def wait_for_spans(
    spans: InMemorySpanExporter, ready: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    for _ in range(200):
        finished = list(spans.get_finished_spans())
        if ready(finished):
            return finished
        await asyncio.sleep(0.02)
    raise AssertionError(f"spans not there: {[s.name for s in spans.get_finished_spans()]}")
