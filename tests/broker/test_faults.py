"""Upstream faults through the real broker: retries, failover, breakers, admission control.

Two upstream SIMULATORS (`tools.simulator`, not models) on 127.0.0.1:0 are the
deployments `one` and `two` of a tenants file, plus `dead`, a port nothing
listens on:

    m          -> one (priority 0), then two (priority 1)
    resilient  -> dead (priority 0), then two (priority 1)
    solo       -> one only
    queued     -> two only; two takes one call at a time, two waiting per tenant

Faults are injected with the simulator's directives and `/_sim/config`; the
simulators' observation logs and the broker's metrics show what happened.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import yaml

from switchboard.broker.breaker import CLOSED, OPEN, CircuitBreaker
from switchboard.broker.service import BrokerServicer
from switchboard.errors import GRPC_CODE_KEY, GRPC_RETRY_KEY
from switchboard.tenancy import LiveTenants, Upstream, hash_key
from tests.broker.harness import (
    B,
    ManualContext,
    Stub,
    collect,
    directive,
    eventually,
    generate_request,
    kinds,
    met,
    rpc_error,
    serving,
    text_of,
    trailers,
    user,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

REPLY_TOKENS = 4


def dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def document(one: str, two: str) -> dict[str, Any]:
    fallback = [{"upstream": "two", "upstream_model": "model-two", "priority": 1}]
    models = {
        "m": {"deployments": [{"upstream": "one", "upstream_model": "model-one"}, *fallback]},
        "resilient": {"deployments": [{"upstream": "dead"}, *fallback]},
        "solo": {"upstream": "one", "upstream_model": "model-one"},
        "queued": {"upstream": "two", "upstream_model": "model-two"},
    }
    return {
        "upstreams": {
            "one": {"base_url": one, "circuit_breaker": {"failures": 2, "cooldown_s": 0.3}},
            "two": {
                "base_url": two,
                "admission": {
                    "max_concurrent": 1,
                    "max_queued_per_tenant": 2,
                    "queue_timeout_s": 30,
                },
            },
            "dead": {"base_url": dead_url()},
        },
        "tenants": {
            "alpha": {"keys": [hash_key("sk-sb-alpha")], "models": models},
            "beta": {"keys": [hash_key("sk-sb-beta")], "models": models},
        },
    }


class Rig(NamedTuple):
    stub: Stub
    servicer: BrokerServicer
    tenants: LiveTenants
    one: RunningSimulator
    two: RunningSimulator

    def upstream(self, name: str) -> Upstream:
        return self.tenants.current.upstreams[name]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    config = SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=0, reply_tokens=REPLY_TOKENS)
    async with run_simulator(config) as one, run_simulator(config) as two:
        path = tmp_path / "tenants.yaml"
        path.write_text(yaml.safe_dump(document(one.base_url, two.base_url)))
        environ = {
            "SWITCHBOARD_TENANTS_FILE": str(path),
            # Small backoffs keep the tests short; the policy is the default one.
            "SWITCHBOARD_BROKER_RETRY_BACKOFF_S": "0.02",
        }
        async with serving(environ) as (stub, servicer, tenants):
            yield Rig(stub, servicer, tenants, one, two)


def call(model: str, text: str = "hi", tenant: str = "alpha") -> Any:
    return generate_request(user(text), tenant_id=tenant, model=model)


async def outcomes(sim: RunningSimulator) -> list[str]:
    return [record["outcome"] for record in await sim.streams()]


def counter(servicer: BrokerServicer, name: str, *labels: str) -> float:
    return float(getattr(servicer.metrics, name).labels(*labels)._value.get())


def breaker(rig: Rig, upstream: str) -> CircuitBreaker:
    return rig.servicer.dispatcher.breakers.get(rig.upstream(upstream))


# ------------------------------------------------------------ retries, failover


async def test_a_failing_deployment_fails_over_before_the_first_token(rig: Rig) -> None:
    await rig.one.configure({"status": 503})
    events = await collect(rig.stub, call("m"))
    seen = kinds(events)
    assert (seen[0], seen[-1], set(seen[1:-1])) == ("started", "finished", {"text_delta"})
    assert events[0].started.upstream.startswith("two (")
    assert events[0].started.upstream_model == "model-two"
    assert text_of(events).startswith('turn 1: you said "hi".')
    assert await outcomes(rig.one) == ["failed_status"]
    assert await outcomes(rig.two) == ["completed"]
    assert counter(rig.servicer, "upstream_retries", "one", "server_error") == 1


async def test_a_refused_connection_fails_over(rig: Rig) -> None:
    events = await collect(rig.stub, call("resilient"))
    assert kinds(events)[-1] == "finished"
    assert events[0].started.upstream.startswith("two (")
    assert counter(rig.servicer, "upstream_retries", "dead", "connection") == 1


async def test_a_stream_broken_before_its_first_token_is_tried_elsewhere(rig: Rig) -> None:
    await rig.one.configure({"disconnect_after": 0})
    events = await collect(rig.stub, call("m"))
    assert kinds(events)[-1] == "finished"
    assert await outcomes(rig.one) == ["sim_disconnected"]
    assert await outcomes(rig.two) == ["completed"]
    assert counter(rig.servicer, "upstream_retries", "one", "stream_broken") == 1


async def test_a_stream_broken_after_its_first_token_ends_the_call(rig: Rig) -> None:
    error, seen = await rpc_error(rig.stub, call("m", f"hi {directive(disconnect_after=2)}"))
    assert error.code() == grpc.StatusCode.ABORTED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_stream_broken"
    assert seen[0] == "started" and "text_delta" in seen and "finished" not in seen
    # No second attempt anywhere: the client may have shown the text.
    assert await outcomes(rig.one) == ["sim_disconnected"]
    assert await outcomes(rig.two) == []
    assert breaker(rig, "one").failures == 1


async def test_retry_after_ms_is_honoured(rig: Rig) -> None:
    hello = f"hi {directive(status=429, retry_after_ms=300, fail_times=1)}"
    events = await collect(rig.stub, call("solo", hello))
    assert kinds(events)[-1] == "finished"
    first, second = await rig.one.streams()
    assert (first["outcome"], second["outcome"]) == ("failed_status", "completed")
    assert second["started_at"] - first["ended_at"] >= 0.3
    assert counter(rig.servicer, "upstream_retries", "one", "rate_limited") == 1


async def test_a_retry_after_beyond_the_deadline_fails_at_once(rig: Rig) -> None:
    started = time.monotonic()
    error, seen = await rpc_error(
        rig.stub, call("solo", f"hi {directive(status=429, retry_after=60)}")
    )
    # The 15 s retry deadline cannot fit a 60 s wait: no wait at all.
    assert time.monotonic() - started < 5
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_rate_limited"
    assert float(trailers(error)[GRPC_RETRY_KEY]) == 60
    assert "retry after 60 s" in str(error.details())
    assert seen == []
    assert await outcomes(rig.one) == ["failed_status"]


async def test_attempts_are_bounded_and_the_last_error_is_reported(rig: Rig) -> None:
    error, _ = await rpc_error(rig.stub, call("m", f"hi {directive(status=502)}"))
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert "HTTP 502" in str(error.details())
    # Three attempts: one, two (failover), then one again after a backoff.
    assert await outcomes(rig.one) == ["failed_status"] * 2
    assert await outcomes(rig.two) == ["failed_status"]


# ------------------------------------------------------------- circuit breaker


async def test_the_breaker_opens_skips_the_deployment_and_a_probe_closes_it(rig: Rig) -> None:
    await rig.one.configure({"status": 500})
    for _ in range(2):  # two failures in a row open `one`
        events = await collect(rig.stub, call("m"))
        assert events[0].started.upstream.startswith("two (")
    assert breaker(rig, "one").state == OPEN
    await rig.one.clear()
    events = await collect(rig.stub, call("m"))
    assert events[0].started.upstream.startswith("two (")
    assert await rig.one.streams() == []  # skipped: not even tried

    await rig.one.configure({})  # `one` recovers
    await asyncio.sleep(0.35)  # the cooldown: the next call is the probe
    events = await collect(rig.stub, call("m"))
    assert events[0].started.upstream.startswith("one (")
    assert breaker(rig, "one").state == CLOSED
    transitions = [
        counter(rig.servicer, "breaker_transitions", "one", state)
        for state in ("open", "half_open", "closed")
    ]
    assert transitions == [1, 1, 1]


async def test_a_failed_probe_opens_the_breaker_again(rig: Rig) -> None:
    await rig.one.configure({"status": 500})
    for _ in range(2):
        await collect(rig.stub, call("m"))
    await asyncio.sleep(0.35)
    await rig.one.clear()
    events = await collect(rig.stub, call("m"))  # the probe fails, two answers
    assert events[0].started.upstream.startswith("two (")
    assert await outcomes(rig.one) == ["failed_status"]
    assert breaker(rig, "one").state == OPEN
    assert counter(rig.servicer, "breaker_transitions", "one", "open") == 2


async def test_when_every_deployment_is_open_the_call_fails_at_once(rig: Rig) -> None:
    await rig.one.configure({"status": 500})
    error, _ = await rpc_error(rig.stub, call("solo"))
    assert "HTTP 500" in str(error.details())
    assert await outcomes(rig.one) == ["failed_status"] * 2  # the second failure opened it
    await rig.one.clear()
    error, seen = await rpc_error(rig.stub, call("solo"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
    assert "circuit breaker is open" in str(error.details())
    assert float(trailers(error)[GRPC_RETRY_KEY]) >= 1
    assert seen == []
    assert await rig.one.streams() == []


# ------------------------------------------------------------ admission control


async def test_a_burst_from_one_tenant_does_not_starve_another(rig: Rig) -> None:
    queue = rig.servicer.dispatcher.admission.queue(rig.upstream("two"))
    slow = directive(tokens=8, token_delay_ms=40)
    tasks: list[asyncio.Task[Any]] = []

    async def start(text: str, tenant: str, running: int, queued: int) -> None:
        tasks.append(asyncio.create_task(collect(rig.stub, call("queued", text, tenant))))
        await eventually(lambda: met(queue.running == running and queued == queue.queued))

    await start(f"alpha 1 {slow}", "alpha", 1, 0)
    await start(f"alpha 2 {slow}", "alpha", 1, 1)
    await start(f"alpha 3 {slow}", "alpha", 1, 2)
    # alpha's queue is full: its next call is refused at once ...
    error, _ = await rpc_error(rig.stub, call("queued", f"alpha 4 {slow}", "alpha"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)[GRPC_CODE_KEY] == "server_busy"
    assert "already has 2 calls waiting" in str(error.details())
    assert counter(rig.servicer, "admission_rejections", "two", "tenant_queue_full") == 1
    # ... while beta's is admitted, and served before alpha's last.
    await start(f"beta 1 {slow}", "beta", 1, 3)
    assert counter(rig.servicer, "admission_queued", "two") == 3
    results = await asyncio.gather(*tasks)
    assert all(kinds(events)[-1] == "finished" for events in results)
    served = [record["last_user"] for record in await rig.two.streams()]
    assert served == ["alpha 1", "alpha 2", "beta 1", "alpha 3"]
    assert counter(rig.servicer, "admission_queued", "two") == 0


async def test_a_call_without_response_id_abandoned_at_a_yield_gives_its_slot_back_at_once(
    rig: Rig,
) -> None:
    # grpc.aio may leave the generator suspended at a `yield` when the call is
    # cancelled; the done callback must free the upstream's slot all the same.
    queue = rig.servicer.dispatcher.admission.queue(rig.upstream("two"))
    context = ManualContext()
    slow = directive(tokens=50, token_delay_ms=50)
    request = call("queued", f"hi {slow}")
    request.response_id = ""  # not held: cancelled with its caller
    generator = rig.servicer.Generate(request, context)
    try:
        assert (await anext(generator)).WhichOneof("event") == "started"
        assert queue.running == 1
        for callback in context.callbacks:
            callback(context)
        await eventually(lambda: met(queue.running == 0))
        events = await collect(rig.stub, call("queued", "next", "beta"))
        assert kinds(events)[-1] == "finished"
    finally:
        await generator.aclose()
    assert queue.running == 0


async def test_an_orphan_holds_its_slot_until_cancel(rig: Rig) -> None:
    queue = rig.servicer.dispatcher.admission.queue(rig.upstream("two"))
    request = call("queued", f"hi {directive(tokens=50, token_delay_ms=50)}")
    streaming = rig.stub.Generate(request)
    assert (await streaming.read()).WhichOneof("event") == "started"
    streaming.cancel()
    await eventually(lambda: met(rig.servicer.metrics.orphaned_requests._value.get() == 1))
    assert queue.running == 1  # the model goes on for a re-attach

    cancel = B.CancelRequest(tenant_id=request.tenant_id, response_id=request.response_id)
    assert (await rig.stub.Cancel(cancel)).cancelled
    assert queue.running == 0  # Cancel returns once the slot is back
    events = await collect(rig.stub, call("queued", "next", "beta"))
    assert kinds(events)[-1] == "finished"
