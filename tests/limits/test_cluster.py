"""TenantLimiter on a real 3-node Redis Cluster: every tenant's limits hold exactly.

Tenants are picked so that their keys land on three different nodes; two
RedisCluster clients act as two replicas.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError

from switchboard.limits import TenantLimiter
from tests.limits.conftest import FakeClock
from tools.redis_server import RedisCluster3


def cluster_client(cluster: RedisCluster3, *, max_connections: int = 256) -> RedisCluster:
    # The async cluster client refuses a command at once (MaxConnectionsError)
    # rather than wait when a node's pool is full: size it above the peak
    # concurrency, here ~110 calls per node per client.
    return RedisCluster(
        host="127.0.0.1",
        port=cluster.ports[0],
        max_connections=max_connections,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
    )


@pytest.fixture
async def clients(redis_cluster: RedisCluster3) -> AsyncIterator[tuple[RedisCluster, RedisCluster]]:
    first, second = cluster_client(redis_cluster), cluster_client(redis_cluster)
    await first.initialize()
    await second.initialize()
    yield first, second
    await first.aclose()
    await second.aclose()


@pytest.fixture
async def tenants(clients: tuple[RedisCluster, RedisCluster]) -> dict[int, str]:
    """One fresh tenant per cluster node, by the node's port."""
    found: dict[int, str] = {}
    while len(found) < 3:
        tenant = f"t-{uuid.uuid4().hex[:12]}"
        node = clients[0].get_node_from_key(f"sb:limits:{{{tenant}}}:requests")
        assert node is not None
        found.setdefault(int(node.port), tenant)
    return found


async def test_each_tenants_limits_hold_exactly_on_every_node(
    redis_cluster: RedisCluster3,
    clients: tuple[RedisCluster, RedisCluster],
    tenants: dict[int, str],
) -> None:
    clock = FakeClock()
    replicas = [TenantLimiter(client, clock=clock) for client in clients]

    async def hammer(tenant: str) -> tuple[int, int, list[str]]:
        admits = [replicas[i % 2].admit_request(tenant, per_minute=20) for i in range(150)]
        slots = [
            replicas[i % 2].acquire(tenant, "responses", f"h{i}", limit=3, lease_s=30)
            for i in range(30)
        ]
        ids = [f"r{i}" for i in range(40)]
        reserves = [
            replicas[i % 2].reserve_tokens(tenant, ids[i], 1000, per_minute=10_000, per_day=None)
            for i in range(40)
        ]
        admitted, acquired, reserved = await asyncio.gather(
            asyncio.gather(*admits), asyncio.gather(*slots), asyncio.gather(*reserves)
        )
        granted = [i for i, d in zip(ids, reserved, strict=True) if d.allowed]
        return sum(d.allowed for d in admitted), sum(d.allowed for d in acquired), granted

    results = await asyncio.gather(*(hammer(tenant) for tenant in tenants.values()))
    assert [(admitted, acquired, len(granted)) for admitted, acquired, granted in results] == [
        (20, 3, 10)
    ] * 3

    # Settling on the other replica frees exactly what was not used, per tenant.
    for tenant, (_, _, granted) in zip(tenants.values(), results, strict=True):
        for reservation in granted[:2]:
            await replicas[1].settle_tokens(tenant, reservation, 0)
        again = await asyncio.gather(
            *(
                replicas[i % 2].reserve_tokens(
                    tenant, f"again{i}", 1000, per_minute=10_000, per_day=None
                )
                for i in range(5)
            )
        )
        assert sum(d.allowed for d in again) == 2
        state = await replicas[0].usage(tenant, requests_per_minute=20, tokens_per_minute=10_000)
        assert (state.requests.remaining, state.tokens.remaining) == (0, 0)

    # Each tenant's keys live on the node its hash tag chose: that node has them,
    # the others redirect there.
    for port, tenant in tenants.items():
        for node_port in redis_cluster.ports:
            node = Redis(host="127.0.0.1", port=node_port)
            try:
                if node_port == port:
                    assert await node.exists(f"sb:limits:{{{tenant}}}:requests") == 1
                else:
                    with pytest.raises(MovedError, match=f"127.0.0.1:{port}$"):
                        await node.exists(f"sb:limits:{{{tenant}}}:requests")
            finally:
                await node.aclose()


async def test_a_burst_after_a_script_flush_reloads_scripts_node_by_node(
    redis_cluster: RedisCluster3, tenants: dict[int, str]
) -> None:
    """After a restart or failover the nodes have no scripts; a burst must not
    fan out a SCRIPT LOAD per caller to every node and exhaust the pools."""
    for port in redis_cluster.ports:
        node = Redis(host="127.0.0.1", port=port)
        try:
            await node.script_flush()
        finally:
            await node.aclose()
    # 100 connections per node; 100 concurrent calls per tenant, one tenant per node.
    client = cluster_client(redis_cluster, max_connections=100)
    # As a service's lifespan does: redis-py 8.1's cluster client, hit by a burst
    # before it has loaded the topology, can race and fail a command.
    await client.initialize()
    limiter = TenantLimiter(client, clock=FakeClock())
    try:
        decisions = await asyncio.gather(
            *(
                limiter.admit_request(tenant, per_minute=30)
                for tenant in tenants.values()
                for _ in range(100)
            )
        )
        assert sum(d.allowed for d in decisions) == 3 * 30
    finally:
        await client.aclose()
