"""A response's concurrency slot at the gateway (`gateway.tenant_gate`): renewed while
the response runs, freed within a lease when its gateway dies, and freed at once
by the gateway that resumes the session and finishes the response."""

from __future__ import annotations

import pytest

from switchboard.gateway.tenant_gate import CONNECTION_LEASE_S, TenantGate
from switchboard.limits.decision import RateLimitExceeded
from switchboard.tenancy import Limits, Tenant
from tests.limits.conftest import FakeClock, Replicas, rid

# A connection renews its running response's slot with its own, this often.
RENEWED_EVERY_S = CONNECTION_LEASE_S / 3


def one_at_a_time(tenant: str) -> Tenant:
    return Tenant(tenant, limits=Limits(concurrent_responses=1, tokens_per_minute=100_000))


async def admit(gate: TenantGate, tenant: Tenant) -> str:
    response_id = rid()
    await gate.admit_response(tenant, response_id, prompt_tokens=10, max_output_tokens=10)
    return response_id


async def test_a_running_response_keeps_its_slot_and_a_dead_gateways_slot_lapses(
    replicas: Replicas, clock: FakeClock, tenant: str
) -> None:
    limited = one_at_a_time(tenant)
    gateway, other = (TenantGate(r, reserve_output_tokens=100) for r in replicas)
    running = await gateway.admit_response(limited, rid(), prompt_tokens=10, max_output_tokens=10)
    # Renewed by its connection, the slot outlives any response.
    for _ in range(30):
        clock.advance(RENEWED_EVERY_S)
        await gateway.keep_response(limited, running)
        with pytest.raises(RateLimitExceeded):
            await admit(other, limited)
    # Its gateway dies: no more renewals, and the slot is free within a minute.
    clock.advance(RENEWED_EVERY_S)
    with pytest.raises(RateLimitExceeded):
        await admit(other, limited)
    clock.advance(60 - RENEWED_EVERY_S)
    assert await admit(other, limited)


async def test_the_gateway_that_finishes_a_dead_gateways_response_frees_its_slot(
    replicas: Replicas, clock: FakeClock, tenant: str
) -> None:
    limited = one_at_a_time(tenant)
    dead, resumer = (TenantGate(r, reserve_output_tokens=100) for r in replicas)
    response_id = await admit(dead, limited)
    adopted = resumer.adopt(limited, response_id)
    assert adopted.holds_slot and adopted.holds_reservation
    await resumer.keep_response(limited, adopted)
    await resumer.finish_response(limited, adopted, used_tokens=15)
    assert await admit(resumer, limited)
