"""Tracing: the OTEL_* settings, export to a real OTLP receiver, the trace context over
real grpc.aio calls (client interceptor injects, server interceptor continues), the
servicers' own spans, and trace ids on log lines."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from switchboard import rpc
from switchboard.config import ConfigError
from switchboard.redis_client import redis_client
from switchboard.session.service import SessionServicer
from switchboard.session.store import SessionStore
from switchboard.telemetry import tracing
from switchboard.telemetry.logs import JsonFormatter
from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.catalog import Catalog
from switchboard.toolexec.service import ToolExecServicer
from switchboard.v1 import (
    session_pb2,
    session_pb2_grpc,
    toolexec_pb2,
    toolexec_pb2_grpc,
)
from tests.tracing_support import one, parent_of, served, span_id, trace_id
from tools.otlp_receiver import OtlpReceiver
from tools.redis_server import RedisServer

TOOLEXEC = "switchboard.v1.ToolExecService/Execute"
SESSION_GET = "switchboard.v1.SessionService/GetItem"
GENERATE = "switchboard.v1.BrokerService/Generate"

# --- settings ------------------------------------------------------------------------


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing.TracingSettings.from_environ("broker", {}) is None
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert (
        tracing.TracingSettings.from_environ("broker", {**on, "OTEL_SDK_DISABLED": "true"}) is None
    )
    assert (
        tracing.TracingSettings.from_environ("broker", {**on, "OTEL_TRACES_EXPORTER": "none"})
        is None
    )
    assert not tracing.enabled()


def test_endpoints_and_service_names() -> None:
    base = tracing.TracingSettings.from_environ(
        "session", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"}
    )
    assert base == tracing.TracingSettings("http://127.0.0.1:4318/v1/traces", "switchboard-session")
    exact = tracing.TracingSettings.from_environ(
        "broker",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector:4318/custom",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=from-attrs",
        },
    )
    assert exact == tracing.TracingSettings("https://collector:4318/custom", "from-attrs")
    named = tracing.TracingSettings.from_environ(
        "broker",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_SERVICE_NAME": "edge-broker",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs",
        },
    )
    assert named is not None and named.service_name == "edge-broker"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        tracing.TracingSettings.from_environ(
            "gateway", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", **environ}
        )


def test_a_bad_endpoint_is_named_but_not_shown() -> None:
    secret_url = "ftp://user:hunter2@collector"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") as caught:
        tracing.TracingSettings.from_environ(
            "gateway", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": secret_url}
        )
    assert "hunter2" not in str(caught.value)


def test_the_provider_exports_to_a_real_otlp_receiver() -> None:
    with OtlpReceiver() as receiver:
        settings = tracing.TracingSettings.from_environ(
            "toolexec", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        )
        assert settings is not None
        provider = tracing.build_provider(settings)
        source = provider.get_tracer("test")
        with source.start_as_current_span("outer"), source.start_as_current_span("inner"):
            pass
        provider.shutdown()  # flushes the batch
        outer, inner = sorted(receiver.spans(), key=lambda span: span.name, reverse=True)
    assert (outer.name, inner.name) == ("outer", "inner")
    assert inner.parent_span_id == outer.span_id and inner.trace_id == outer.trace_id
    assert outer.service == "switchboard-toolexec"
    assert outer.resource["service.version"]


# --- propagation over gRPC -------------------------------------------------------------


async def test_a_unary_call_continues_the_callers_trace(
    spans: InMemorySpanExporter, otel_errors: None
) -> None:
    servicer = ToolExecServicer(Catalog(builtin_registry()))

    def register(server: grpc.aio.Server) -> None:
        toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

    async with served(register) as channel:
        stub = toolexec_pb2_grpc.ToolExecServiceStub(channel)
        request = toolexec_pb2.ExecuteRequest(
            tenant_id="t1",
            session_id="sess_1",
            call_id="call_1",
            name="calculate",
            arguments='{"expression": "6*7"}',
        )
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            reply = await stub.Execute(request, timeout=5)
    assert orjson.loads(reply.output) == {"result": 42}
    finished = list(spans.get_finished_spans())
    client = one(finished, TOOLEXEC, SpanKind.CLIENT)
    server = one(finished, TOOLEXEC, SpanKind.SERVER)
    execution = one(finished, "execute_tool calculate", SpanKind.INTERNAL)
    assert parent_of(client) == caller.get_span_context().span_id
    assert parent_of(server) == span_id(client)
    assert server.parent is not None and server.parent.is_remote
    assert parent_of(execution) == span_id(server)
    assert {trace_id(s) for s in (client, server, execution)} == {
        caller.get_span_context().trace_id
    }
    assert client.attributes is not None and server.attributes is not None
    for side in (client, server):
        assert side.attributes is not None
        assert side.attributes["rpc.system.name"] == "grpc"
        assert side.attributes["rpc.method"] == TOOLEXEC
        assert side.attributes["rpc.response.status_code"] == "OK"
        assert side.attributes[tracing.TENANT_ID] == "t1"
        assert side.attributes[tracing.SESSION_ID] == "sess_1"
        assert side.status.is_ok
    assert client.attributes["server.address"] == "127.0.0.1"
    assert isinstance(client.attributes["server.port"], int)
    assert execution.attributes == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "calculate",
        "gen_ai.tool.call.id": "call_1",
        tracing.TENANT_ID: "t1",
        tracing.SESSION_ID: "sess_1",
        "switchboard.tool.outcome": "ok",
        "switchboard.tool.replayed": False,
    }


async def test_a_refused_tool_call_is_an_error_span_named_by_its_code(
    spans: InMemorySpanExporter,
) -> None:
    servicer = ToolExecServicer(Catalog(builtin_registry()))

    def register(server: grpc.aio.Server) -> None:
        toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

    async with served(register) as channel:
        stub = toolexec_pb2_grpc.ToolExecServiceStub(channel)
        request = toolexec_pb2.ExecuteRequest(
            tenant_id="t1", call_id="call_2", name="no_such_tool", arguments="{}"
        )
        await stub.Execute(request, timeout=5)
    execution = one(list(spans.get_finished_spans()), "execute_tool", SpanKind.INTERNAL)
    assert execution.attributes is not None
    assert execution.attributes["error.type"] == "tool_not_found"
    assert execution.attributes["switchboard.tool.outcome"] == "unknown_tool"
    assert not execution.status.is_ok


async def test_a_backend_error_names_its_code_on_both_sides(
    spans: InMemorySpanExporter, redis_server: RedisServer, otel_errors: None
) -> None:
    client = redis_client(redis_server.url)
    servicer = SessionServicer(SessionStore(client, ttl_s=60), default_context_tokens=1000)
    try:
        async with served(servicer.register) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            request = session_pb2.GetItemRequest(
                tenant_id=f"t-{uuid.uuid4().hex[:8]}", session_id="sess_missing", item_id="item_1"
            )
            with (
                trace.get_tracer("test").start_as_current_span("caller"),
                pytest.raises(grpc.aio.AioRpcError) as caught,
            ):
                await stub.GetItem(request, timeout=5)
    finally:
        await client.aclose()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # the caller still sees the error
    finished = list(spans.get_finished_spans())
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        side = one(finished, SESSION_GET, kind)
        assert side.attributes is not None
        assert side.attributes["error.type"] == "session_not_found"
        assert side.attributes["rpc.response.status_code"] == "NOT_FOUND"
        assert not side.status.is_ok
        assert side.status.description == "session_not_found"  # the code, never the message
        assert not side.events  # nor the exception, whose message may quote input


async def test_calls_outside_any_span_are_not_traced(spans: InMemorySpanExporter) -> None:
    """Background calls (event-log batches, lease renewals) would each start a trace."""
    servicer = ToolExecServicer(Catalog(builtin_registry()))

    def register(server: grpc.aio.Server) -> None:
        toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

    async with served(register) as channel:
        stub = toolexec_pb2_grpc.ToolExecServiceStub(channel)
        reply = await stub.ListTools(toolexec_pb2.ListToolsRequest(tenant_id="t1"), timeout=5)
        assert reply.tools  # the call itself works
        with trace.get_tracer("test").start_as_current_span("caller"):
            await stub.ListTools(toolexec_pb2.ListToolsRequest(tenant_id="t1"), timeout=5)
    names = sorted((s.name, s.kind.name) for s in spans.get_finished_spans())
    assert names == [
        ("caller", "INTERNAL"),
        ("switchboard.v1.ToolExecService/ListTools", "CLIENT"),
        ("switchboard.v1.ToolExecService/ListTools", "SERVER"),
    ]


async def test_health_checks_make_no_spans(spans: InMemorySpanExporter) -> None:
    servicer = health.aio.HealthServicer()

    def register(server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    async with served(register) as channel:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        with trace.get_tracer("test").start_as_current_span("caller"):
            assert await rpc.check_health(channel)
    assert [s.name for s in spans.get_finished_spans()] == ["caller"]


# --- logs --------------------------------------------------------------------------------


def test_log_lines_carry_the_current_trace(spans: InMemorySpanExporter) -> None:
    formatter = JsonFormatter("test")

    def line() -> dict[str, Any]:
        record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "t"})
        parsed: dict[str, Any] = orjson.loads(formatter.format(record))
        return parsed

    assert "trace_id" not in line()
    with trace.get_tracer("test").start_as_current_span("work") as work:
        inside = line()
    context = work.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
