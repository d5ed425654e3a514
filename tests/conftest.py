"""Fixtures shared by the whole suite: real servers, started cheaply."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from tools.redis_server import RedisCluster3, RedisServer

# The gateways the tests start do not shed load: on a busy test machine a
# gateway's event loop can run a quarter of a second late without being
# overloaded by its own work, and a refused request would fail a test about
# something else. tests/e2e/test_overload.py turns shedding on for its stack.
os.environ.setdefault("SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS", "0")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, once per test session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster3]:
    """A real 3-node Redis Cluster on 127.0.0.1, once per test session."""
    with RedisCluster3() as cluster:
        yield cluster


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span ended during the test, through a tracer provider installed for it alone.

    Installed as the global provider (so `switchboard.telemetry.tracing.enabled()` is true
    and the servicers' own spans are recorded), and removed afterwards. The
    API lets a process set its provider only once, so the test resets the two
    module globals behind that rule, as OpenTelemetry's own test helpers do.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _install_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _install_tracer_provider(None)
        provider.shutdown()


def _install_tracer_provider(provider: TracerProvider | None) -> None:
    otel_trace._TRACER_PROVIDER_SET_ONCE = Once()
    otel_trace._TRACER_PROVIDER = None
    if provider is not None:
        otel_trace.set_tracer_provider(provider)


@pytest.fixture
def otel_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test when OpenTelemetry logged an error (a context left attached, say)."""
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        yield
    problems = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]
    assert not problems
