"""The gateway's lease renewals (leases.py): every held lease renewed in one
batch call a tick, each connection handed exactly its own outcome."""

from __future__ import annotations

import asyncio

from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.eventlog import EventRecorder, SessionWriter
from switchboard.gateway.leases import LeaseRenewals, Outcome
from switchboard.gateway.testing import MemoryBackends, eventually
from switchboard.v1 import common_pb2, session_pb2

TENANT = "leases"
# Renewals every 0.1 s.
LEASE_S = 0.3


async def writers(backends: MemoryBackends, count: int) -> list[SessionWriter]:
    recorder = EventRecorder(backends)
    config = session_pb2.SessionConfig(model="gpt-realtime")
    sessions = [await backends.create_session(TENANT, config) for _ in range(count)]
    return [
        SessionWriter(backends, recorder, TENANT, session.id, f"conn_{n}", LEASE_S)
        for n, session in enumerate(sessions)
    ]


def name(outcome: Outcome) -> str:
    if isinstance(outcome, SessionTakenOver):
        return "taken_over"
    if isinstance(outcome, SwitchboardError):
        return outcome.name
    return "handoff_requested" if outcome else "renewed"


async def test_one_batch_renews_all_and_each_connection_gets_its_own_outcome() -> None:
    backends = MemoryBackends()
    # Batches of 2, so the outcomes of several calls must land in their places too.
    renewals = LeaseRenewals(backends, LEASE_S, max_batch=2)
    held = await writers(backends, 7)
    outcomes: dict[int, list[str]] = {n: [] for n in range(len(held))}
    # 0, 3, 6: plain renewals. 1: taken by another connection (its lease had
    # lapsed). 2: asked for by another connection. 4: its session is gone.
    # 5: not due (its appends keep the lease).
    taken, wanted, gone, skipped = held[1], held[2], held[4], held[5]
    for writer in (held[0], wanted):
        await backends.claim_session(TENANT, writer.session_id, writer.holder, 300)
    await backends.claim_session(TENANT, taken.session_id, "conn_elsewhere", 10_000)
    assert not (
        await backends.claim_session(TENANT, wanted.session_id, "conn_resumer", 300)
    ).claimed
    backends.forget(TENANT, gone.session_id)
    leases = [
        renewals.hold(
            writer,
            lambda outcome, n=n: outcomes[n].append(name(outcome)),
            due=lambda writer=writer: writer is not skipped,
        )
        for n, writer in enumerate(held)
    ]
    await eventually(lambda: backends.calls["claim_sessions_batch"] >= 3)
    await eventually(lambda: all(outcomes[n] for n in (0, 1, 2, 3, 4, 6)))
    first = {n: seen[0] for n, seen in outcomes.items() if seen}
    assert first == {
        0: "renewed",
        1: "taken_over",
        2: "handoff_requested",
        3: "renewed",
        4: "session_not_found",
        6: "renewed",
    }
    for lease in leases:
        lease.stop()
    for lease in leases:
        await lease.drop()
    # Six due leases in batches of 2: three calls a tick, and none for the one not due.
    assert backends.calls["claim_sessions_batch"] % 3 == 0
    assert outcomes[5] == []
    await renewals.close()


async def test_a_dropped_lease_waits_for_its_renewal_in_flight_and_gets_no_outcome() -> None:
    backends = MemoryBackends()
    renewals = LeaseRenewals(backends, LEASE_S)
    (writer,) = await writers(backends, 1)
    outcomes: list[Outcome] = []
    gate = backends.gates["claim_sessions_batch"] = asyncio.Event()
    lease = renewals.hold(writer, outcomes.append)
    await eventually(lambda: backends.calls["claim_sessions_batch"] == 1)
    drop = asyncio.create_task(lease.drop())
    await asyncio.sleep(0.05)
    # The claim has not landed: a release now could be undone by it.
    assert not drop.done()
    gate.set()
    await asyncio.wait_for(drop, 5)
    await asyncio.sleep(3 * renewals.interval_s)
    assert outcomes == []
    assert backends.calls["claim_sessions_batch"] == 1
    await renewals.close()


async def test_a_failed_batch_reaches_every_lease_and_the_next_tick_tries_again() -> None:
    backends = MemoryBackends()
    renewals = LeaseRenewals(backends, LEASE_S)
    held = await writers(backends, 3)
    outcomes: dict[int, list[str]] = {n: [] for n in range(len(held))}
    backends.failures["claim_sessions_batch"] = SwitchboardError(
        "The session store is unavailable.", code=common_pb2.ERROR_CODE_SESSION_STORE_UNAVAILABLE
    )
    leases = [
        renewals.hold(writer, lambda outcome, n=n: outcomes[n].append(name(outcome)))
        for n, writer in enumerate(held)
    ]
    await eventually(lambda: all(outcomes.values()))
    assert {seen[0] for seen in outcomes.values()} == {"session_store_unavailable"}
    del backends.failures["claim_sessions_batch"]
    await eventually(lambda: all(seen[-1] == "renewed" for seen in outcomes.values()))
    for lease in leases:
        await lease.drop()
    await renewals.close()
