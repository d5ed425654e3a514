"""`UpstreamClients`: one client per upstream, built on first use, replaced and closed on change.

Against a real upstream SIMULATOR (`tools.simulator`, not a model) on 127.0.0.1:0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from switchboard.broker.clients import UpstreamClients
from switchboard.broker.translate import chat_request
from switchboard.config import BrokerSettings, Secret
from switchboard.tenancy import TenantDirectory, Upstream, UpstreamAdmission
from tests.broker.harness import directive, eventually, generate_request, met, user
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

KEY = "sk-upstreams-test-0123456789abcdef"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=0)) as running:
        yield running


@pytest.fixture
async def clients() -> AsyncIterator[UpstreamClients]:
    registry = UpstreamClients(BrokerSettings.from_environ({}))
    try:
        yield registry
    finally:
        await registry.aclose()


def directory(*upstreams: Upstream) -> TenantDirectory:
    return TenantDirectory(tenants={}, upstreams={u.name: u for u in upstreams})


async def test_one_client_per_upstream_until_its_url_or_key_changes(
    clients: UpstreamClients, sim: RunningSimulator
) -> None:
    one = Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY")
    first = clients.client(one)
    assert clients.client(Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY")) is first
    # Another variable holding the same key is the same client.
    assert clients.client(Upstream("one", sim.base_url, Secret(KEY), "OTHER")) is first
    assert clients.client(Upstream("two", sim.base_url, Secret(KEY))) is not first

    rotated = clients.client(Upstream("one", sim.base_url, Secret(KEY + "-next")))
    assert rotated is not first
    await eventually(lambda: met(first.closed))
    assert not rotated.closed


async def test_a_reload_retires_changed_and_removed_upstreams_only(
    clients: UpstreamClients, sim: RunningSimulator
) -> None:
    kept = clients.client(Upstream("kept", sim.base_url))
    moved = clients.client(Upstream("moved", sim.base_url))
    gone = clients.client(Upstream("gone", sim.base_url))
    clients.reconcile(directory(Upstream("kept", sim.base_url), Upstream("moved", sim.url + "/v2")))
    assert clients.current() == {"kept": kept}
    await eventually(lambda: met(moved.closed and gone.closed))
    assert not kept.closed


async def test_the_pool_is_as_large_as_admission_and_follows_it(
    clients: UpstreamClients, sim: RunningSimulator
) -> None:
    # The broker's default (SWITCHBOARD_BROKER_MAX_CONCURRENT), then the file's own.
    default = clients.client(Upstream("one", sim.base_url))
    assert default.pool_limit == 64
    eight = Upstream("one", sim.base_url, admission=UpstreamAdmission(max_concurrent=8))
    clients.reconcile(directory(eight))
    resized = clients.client(eight)
    assert resized is not default
    assert resized.pool_limit == 8
    await eventually(lambda: met(default.closed))


async def test_shutdown_closes_current_and_retired_clients(sim: RunningSimulator) -> None:
    clients = UpstreamClients(BrokerSettings.from_environ({}))
    old = clients.client(Upstream("one", sim.base_url))
    slow = generate_request(user(f"go {directive(token_delay_ms=50, tokens=50)}"))
    async with old.stream(chat_request(slow, None)) as chunks:
        await anext(aiter(chunks))
        new = clients.client(Upstream("one", sim.base_url, Secret(KEY)))
        await asyncio.sleep(0.01)
        assert (old.active, old.closed) == (1, False)  # retired, still streaming
        await clients.aclose()
        assert old.closed and new.closed


async def test_the_key_never_shows(clients: UpstreamClients, sim: RunningSimulator) -> None:
    client = clients.client(Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY"))
    host = sim.url.removeprefix("http://")
    assert client.description == f"one ({host})"
    shown = f"{client!r} {client} {client.upstream!r} {clients.current()!r}"
    assert KEY not in shown
    assert "one" in shown
