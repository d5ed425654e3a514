"""`Upstreams`: one client per upstream, built on first use, replaced and closed on change.

Against a real upstream SIMULATOR (`tools.simulator`, not a model) on 127.0.0.1:0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from switchboard.broker.translate import chat_request
from switchboard.broker.upstreams import Upstreams
from switchboard.config import BrokerSettings, Secret
from switchboard.tenancy import TenantDirectory, Upstream
from tests.broker.harness import directive, eventually, generate_request, user
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

KEY = "sk-upstreams-test-0123456789abcdef"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=0)) as running:
        yield running


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    registry = Upstreams(BrokerSettings.from_environ({}))
    try:
        yield registry
    finally:
        await registry.aclose()


def directory(*upstreams: Upstream) -> TenantDirectory:
    return TenantDirectory(tenants={}, upstreams={u.name: u for u in upstreams})


async def _true(condition: bool) -> bool | None:
    return True if condition else None


async def test_one_client_per_upstream_until_its_url_or_key_changes(
    upstreams: Upstreams, sim: RunningSimulator
) -> None:
    one = Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY")
    first = upstreams.client(one)
    assert upstreams.client(Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY")) is first
    # Another variable holding the same key is the same client.
    assert upstreams.client(Upstream("one", sim.base_url, Secret(KEY), "OTHER")) is first
    assert upstreams.client(Upstream("two", sim.base_url, Secret(KEY))) is not first

    rotated = upstreams.client(Upstream("one", sim.base_url, Secret(KEY + "-next")))
    assert rotated is not first
    await eventually(lambda: _true(first.closed))
    assert not rotated.closed


async def test_a_reload_retires_changed_and_removed_upstreams_only(
    upstreams: Upstreams, sim: RunningSimulator
) -> None:
    kept = upstreams.client(Upstream("kept", sim.base_url))
    moved = upstreams.client(Upstream("moved", sim.base_url))
    gone = upstreams.client(Upstream("gone", sim.base_url))
    upstreams.reconcile(
        directory(Upstream("kept", sim.base_url), Upstream("moved", sim.url + "/v2"))
    )
    assert upstreams.clients() == {"kept": kept}
    await eventually(lambda: _true(moved.closed and gone.closed))
    assert not kept.closed


async def test_shutdown_closes_current_and_retired_clients(sim: RunningSimulator) -> None:
    upstreams = Upstreams(BrokerSettings.from_environ({}))
    old = upstreams.client(Upstream("one", sim.base_url))
    slow = generate_request(user(f"go {directive(token_delay_ms=50, tokens=50)}"))
    async with old.stream(chat_request(slow, None)) as chunks:
        await anext(aiter(chunks))
        new = upstreams.client(Upstream("one", sim.base_url, Secret(KEY)))
        await asyncio.sleep(0.01)
        assert (old.active, old.closed) == (1, False)  # retired, still streaming
        await upstreams.aclose()
        assert old.closed and new.closed


async def test_the_key_never_shows(upstreams: Upstreams, sim: RunningSimulator) -> None:
    client = upstreams.client(Upstream("one", sim.base_url, Secret(KEY), "ONE_KEY"))
    host = sim.url.removeprefix("http://")
    assert client.description == f"one ({host})"
    shown = f"{client!r} {client} {client.upstream!r} {upstreams.clients()!r}"
    assert KEY not in shown
    assert "one" in shown
