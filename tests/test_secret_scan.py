"""The log and span scans of the end-to-end suite find key material when there is some."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from tests.e2e.conftest import secret_leaks, span_leaks
from tools.otlp_receiver import OtlpReceiver
from tools.stack import SIMULATOR_KEY, Stack


def test_scan_finds_each_kind_of_secret(tmp_path: Path) -> None:
    stack = Stack(log_dir=tmp_path, dev_key="sk-sb-" + "d" * 43)
    (tmp_path / "gateway.log").write_text(
        '{"msg": "connected"}\n'
        '{"msg": "auth", "key": "sk-sb-AAAAAAAAAAAAAAAAAAAAAAAA"}\n'
        '{"msg": "ok"}\n'
        '{"msg": "secret ek_BBBBBBBBBBBBBBBBBBBBBBBB"}\n'
    )
    (tmp_path / "broker.log").write_text(f"upstream key {SIMULATOR_KEY}\n")
    leaks = secret_leaks(stack)
    assert [leak.split(": ")[0] for leak in leaks] == [
        "broker.log:1",
        "gateway.log:2",
        "gateway.log:4",
    ]


def test_clean_logs_have_no_leaks(tmp_path: Path) -> None:
    (tmp_path / "session.log").write_text('{"msg": "listening", "tenant_id": "dev"}\n')
    assert secret_leaks(Stack(log_dir=tmp_path, dev_key="sk-sb-" + "e" * 43)) == []


def test_span_scan_finds_secrets_in_any_field() -> None:
    """Spans sent through a real OTLP/HTTP export, decoded by the receiver, then scanned."""
    key, secret = "sk-sb-" + "f" * 43, "ek_" + "g" * 32
    with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        )
        source = provider.get_tracer("test")
        with source.start_as_current_span("clean", attributes={"switchboard.tenant.id": "dev"}):
            pass
        with source.start_as_current_span("attribute", attributes={"header": f"Bearer {key}"}):
            pass
        with source.start_as_current_span("event") as span:
            span.add_event("auth", {"value": secret})
        with source.start_as_current_span("status") as span:
            span.set_status(Status(StatusCode.ERROR, f"upstream said {SIMULATOR_KEY}"))
        with source.start_as_current_span(f"name {secret}"):
            pass
        provider.shutdown()
        spans = receiver.spans()
    assert len(spans) == 5
    leaks = span_leaks(spans)
    assert [leak.split(":")[0] for leak in leaks] == [
        "test 'attribute'",
        "test 'event'",
        "test 'status'",
        f"test 'name {secret}'",
    ]
