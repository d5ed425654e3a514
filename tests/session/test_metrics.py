"""The session service counts and times its calls, and tells when Redis is away."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from switchboard import rpc
from switchboard.session.metrics import SessionMetrics
from switchboard.session.service import SessionServicer
from switchboard.session.store import SessionStore
from switchboard.v1 import session_pb2_grpc
from tests.metrics_support import conventional_families
from tests.session.support import (
    S,
    Stub,
    create,
    eventually,
    main_serving,
    rpc_error,
    run_main,
    start_server,
)
from tools.redis_server import RedisServer, free_port


@pytest.fixture
async def served(store: SessionStore) -> AsyncIterator[tuple[Stub, SessionMetrics]]:
    metrics = SessionMetrics()
    servicer = SessionServicer(store, default_context_tokens=1000, metrics=metrics)
    server, port = await start_server(servicer)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield session_pb2_grpc.SessionServiceStub(channel), metrics
    await server.stop(None)


def calls(metrics: SessionMetrics, method: str, outcome: str) -> float:
    labels = {"method": method, "outcome": outcome}
    return metrics.registry.get_sample_value("switchboard_session_rpcs_total", labels) or 0.0


async def test_calls_are_counted_and_timed_by_method_and_outcome(
    served: tuple[Stub, SessionMetrics],
) -> None:
    stub, metrics = served
    session = await create(stub, "acme")
    await stub.GetSession(S.GetSessionRequest(tenant_id="acme", session_id=session.id))
    await stub.GetSession(S.GetSessionRequest(tenant_id="acme", session_id=session.id))
    await rpc_error(stub.GetSession(S.GetSessionRequest(tenant_id="acme", session_id="sess_no")))
    await rpc_error(stub.GetSession(S.GetSessionRequest(tenant_id="", session_id=session.id)))

    assert calls(metrics, "CreateSession", "ok") == 1
    assert calls(metrics, "GetSession", "ok") == 2
    assert calls(metrics, "GetSession", "session_not_found") == 1
    assert calls(metrics, "GetSession", "missing_required_parameter") == 1
    timed = metrics.registry.get_sample_value(
        "switchboard_session_rpc_duration_seconds_count", {"method": "GetSession", "outcome": "ok"}
    )
    assert timed == 2
    # Tenant and session ids never become labels.
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    assert not any(session.id in str(s.labels) or "acme" in str(s.labels) for s in samples)


def scrape_value(text: str, sample: str) -> float | None:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


async def test_the_service_serves_metrics_and_counts_a_redis_outage() -> None:
    redis = RedisServer()
    redis.start()
    address, metrics_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "SWITCHBOARD_REDIS_URL": redis.url,
        "SWITCHBOARD_SESSION_LISTEN": address,
        "SWITCHBOARD_SESSION_METRICS_LISTEN": metrics_address,
    }
    process = run_main(env, stdout=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http, rpc.channel(address) as channel:

            async def scrape() -> str:
                async with http.get(f"http://{metrics_address}/metrics") as reply:
                    assert reply.status == 200
                    return await reply.text()

            await main_serving(process, channel)
            stub = session_pb2_grpc.SessionServiceStub(channel)
            session = await create(stub, "acme")
            text = await scrape()
            assert scrape_value(text, "switchboard_session_redis_up") == 1.0
            created = 'switchboard_session_rpcs_total{method="CreateSession",outcome="ok"}'
            assert scrape_value(text, created) == 1.0

            redis.stop(kill=True)
            request = S.GetSessionRequest(tenant_id="acme", session_id=session.id)
            error = await rpc_error(stub.GetSession(request, timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE

            async def redis_down_reported() -> bool:
                return scrape_value(await scrape(), "switchboard_session_redis_up") == 0.0

            await eventually(redis_down_reported, timeout_s=5.0)
            text = await scrape()
            failed = (
                'switchboard_session_rpcs_total{method="GetSession",'
                'outcome="session_store_unavailable"}'
            )
            assert scrape_value(text, failed) == 1.0
            refused = 'switchboard_session_redis_errors_total{error="ConnectionError"}'
            assert (scrape_value(text, refused) or 0) >= 1.0
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0, stderr
        assert "metrics listening" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        redis.close()


def test_names_types_and_labels_follow_the_conventions() -> None:
    metrics = SessionMetrics()
    # Labelled families show their samples (and so their labels) once used.
    metrics.observe("GetSession", "ok", 0.001)
    metrics.redis_errors.labels("ConnectionError").inc()
    families = conventional_families(
        metrics.registry,
        service="session",
        gauge_suffixes=("_up",),
        labels={"method", "outcome", "error"},
    )
    assert len(families) == 4
