"""The tenants' tool catalogues, shared by a gateway's sessions (server_tools.py)."""

from __future__ import annotations

import asyncio

from switchboard.errors import ServiceUnavailable
from switchboard.gateway.server_tools import ServerTools, ToolCatalogues
from switchboard.gateway.testing import MemoryBackends
from switchboard.gateway.testing.backends import canned_tool


async def test_sessions_of_a_tenant_share_one_list_tools_call() -> None:
    backends = MemoryBackends()
    backends.tools["lookup"] = canned_tool("lookup")
    listed = backends.gates["list_tools"] = asyncio.Event()
    catalogues = ToolCatalogues(backends)
    sessions = [ServerTools(backends, "acme", f"sess_{n}", catalogues) for n in range(3)]
    # Three sessions miss the catalogue at once: one call answers all three.
    asking = [asyncio.ensure_future(tools.catalogue()) for tools in sessions]
    await asyncio.sleep(0)
    listed.set()
    for catalogue in await asyncio.gather(*asking):
        assert list(catalogue) == ["lookup"]
    assert backends.calls["list_tools"] == 1
    # A later session of the tenant is served from the cache; another tenant asks.
    assert list(await ServerTools(backends, "acme", "sess_4", catalogues).catalogue())
    assert backends.calls["list_tools"] == 1
    await ServerTools(backends, "globex", "sess_5", catalogues).catalogue()
    assert backends.calls["list_tools"] == 2


async def test_a_failed_listing_offers_no_server_tools_and_is_not_kept() -> None:
    backends = MemoryBackends()
    backends.tools["lookup"] = canned_tool("lookup")
    backends.failures["list_tools"] = ServiceUnavailable("toolexec is down")
    catalogues = ToolCatalogues(backends)
    assert await ServerTools(backends, "acme", "sess_1", catalogues).catalogue() == {}
    del backends.failures["list_tools"]
    assert list(await ServerTools(backends, "acme", "sess_2", catalogues).catalogue()) == ["lookup"]
    assert backends.calls["list_tools"] == 2


async def test_a_session_that_stops_waiting_does_not_fail_the_others() -> None:
    backends = MemoryBackends()
    backends.tools["lookup"] = canned_tool("lookup")
    listed = backends.gates["list_tools"] = asyncio.Event()
    catalogues = ToolCatalogues(backends)
    fetcher = asyncio.ensure_future(catalogues.get("acme", "sess_1"))
    waiter = asyncio.ensure_future(catalogues.get("acme", "sess_2"))
    await asyncio.sleep(0)
    waiter.cancel()  # its response failed before it needed the tools
    listed.set()
    assert list(await fetcher) == ["lookup"]
    assert backends.calls["list_tools"] == 1

    # The session fetching stops waiting: one that waited for it fetches itself.
    catalogues = ToolCatalogues(backends)
    listed.clear()
    fetcher = asyncio.ensure_future(catalogues.get("acme", "sess_1"))
    waiter = asyncio.ensure_future(catalogues.get("acme", "sess_2"))
    await asyncio.sleep(0)
    fetcher.cancel()
    await asyncio.sleep(0)
    listed.set()
    assert list(await waiter) == ["lookup"]
    assert backends.calls["list_tools"] == 3
