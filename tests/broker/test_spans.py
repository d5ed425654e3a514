"""The broker's model span (`broker.spans.ChatSpan`) through a real grpc.aio server with the
tracing interceptors, against the real upstream SIMULATOR (`tools.simulator`, not a model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from switchboard.broker.service import running
from switchboard.config import BrokerSettings
from switchboard.telemetry import tracing
from switchboard.tenancy import hash_key, load_tenants
from switchboard.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.tracing_support import one, parent_of, served, span_id, trace_id, wait_for_spans
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

GENERATE = "switchboard.v1.BrokerService/Generate"
UPSTREAM_KEY = "sk-test-tracing-upstream"


@asynccontextmanager
async def broker(sim: RunningSimulator) -> AsyncIterator[Any]:
    environ = {
        "SWITCHBOARD_TENANT_KEYS": f"t1={hash_key('sk-sb-tracing-test-key')}",
        "SWITCHBOARD_BROKER_UPSTREAM_URL": sim.base_url,
        "SWITCHBOARD_BROKER_UPSTREAM_API_KEY": UPSTREAM_KEY,
    }
    async with (
        running(BrokerSettings.from_environ(environ), load_tenants(environ)) as servicer,
        served(servicer.register) as channel,
    ):
        yield broker_pb2_grpc.BrokerServiceStub(channel)


def generate_request(text: str, **fields: Any) -> broker_pb2.GenerateRequest:
    part = common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text=text)
    item = common_pb2.Item(type=common_pb2.ITEM_TYPE_MESSAGE, role=common_pb2.ROLE_USER)
    item.content.append(part)
    request = broker_pb2.GenerateRequest(
        tenant_id="t1", session_id="sess_1", response_id="resp_1", model="sim-small", **fields
    )
    request.context.items.append(item)
    return request


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig(port=0, ttft_ms=5, token_delay_ms=2, reply_tokens=8)
    async with run_simulator(config) as running_sim:
        yield running_sim


async def test_a_stream_is_traced_to_the_upstream_with_genai_attributes(
    spans: InMemorySpanExporter, sim: RunningSimulator, otel_errors: None
) -> None:
    async with broker(sim) as stub:
        with trace.get_tracer("test").start_as_current_span("caller"):
            events = [e async for e in stub.Generate(generate_request("hi", max_output_tokens=64))]
    finished = events[-1].finished
    spans_now = await wait_for_spans(
        spans, lambda done: any(s.name == GENERATE and s.kind == SpanKind.CLIENT for s in done)
    )
    client = one(spans_now, GENERATE, SpanKind.CLIENT)
    server = one(spans_now, GENERATE, SpanKind.SERVER)
    chat = one(spans_now, "chat sim-small", SpanKind.CLIENT)
    assert parent_of(server) == span_id(client)
    assert parent_of(chat) == span_id(server)
    assert server.attributes is not None
    assert server.attributes[tracing.RESPONSE_ID] == "resp_1"
    assert chat.attributes is not None
    attributes = dict(chat.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "sim-small"
    assert attributes["gen_ai.response.model"] == "sim-small"
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.usage.input_tokens"] == finished.usage.input_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == finished.usage.output_tokens > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl-")
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == urlsplit(sim.base_url).port
    assert attributes[tracing.TENANT_ID] == "t1"
    # The upstream HTTP request carried the model span as its parent.
    (record,) = await sim.streams()
    version, trace_hex, parent_hex, flags = record["traceparent"].split("-")
    assert version == "00"
    assert (trace_hex, parent_hex) == (f"{trace_id(chat):032x}", f"{span_id(chat):016x}")
    assert int(flags, 16) & 1  # sampled
    # No key anywhere on a span.
    for span in spans_now:
        assert UPSTREAM_KEY not in span.to_json()


async def test_a_cancelled_stream_ends_every_span(
    spans: InMemorySpanExporter, sim: RunningSimulator, otel_errors: None
) -> None:
    slow = '[[sim {"ttft_ms": 5, "token_delay_ms": 200, "tokens": 50}]]'
    async with broker(sim) as stub:
        with trace.get_tracer("test").start_as_current_span("caller"):
            call = stub.Generate(generate_request(f"long {slow}"))
        async for event in call:
            if event.WhichOneof("event") == "text_delta":
                break
        # Cancelled alone the call would run on for a re-attach: Cancel stops it.
        call.cancel()
        cancel = broker_pb2.CancelRequest(tenant_id="t1", response_id="resp_1")
        assert (await stub.Cancel(cancel)).cancelled
        finished = await wait_for_spans(
            spans, lambda done: any(s.name.startswith("chat ") for s in done) and len(done) >= 3
        )
    client = one(finished, GENERATE, SpanKind.CLIENT)
    server = one(finished, GENERATE, SpanKind.SERVER)
    chat = one(finished, "chat sim-small", SpanKind.CLIENT)
    for span in (client, server, chat):
        assert span.attributes is not None
        assert span.attributes[tracing.CANCELLED] is True, span.name
    assert client.attributes is not None
    assert client.attributes["rpc.response.status_code"] == "CANCELLED"
