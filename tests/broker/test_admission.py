"""Admission control: the fair scheduler by an explicit clock, then its asyncio driver."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.broker.admission import (
    EXPIRED,
    GRANTED,
    WAITING,
    Admission,
    AdmissionLimits,
    FairQueue,
    Ticket,
)
from switchboard.broker.metrics import BrokerMetrics
from switchboard.errors import ServerBusy
from switchboard.tenancy import Upstream, UpstreamAdmission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fair_queue(
    slots: int = 1, queued: int = 10, per_tenant: int = 10, timeout_s: float = 5.0
) -> tuple[FairQueue, Clock]:
    clock = Clock()
    limits = AdmissionLimits(slots, queued, per_tenant, timeout_s)
    return FairQueue(limits, clock), clock


def ticket(queue: FairQueue, tenant: str, woken: list[str] | None = None) -> Ticket:
    entered = queue.enter(tenant)
    assert isinstance(entered, Ticket), entered
    if woken is not None:
        entered.wake = lambda: woken.append(tenant)
    return entered


# ------------------------------------------------------------- FairQueue (pure)


def test_slots_are_granted_at_once_until_they_run_out() -> None:
    queue, _ = fair_queue(slots=2)
    assert ticket(queue, "a").state == GRANTED
    assert ticket(queue, "b").state == GRANTED
    assert ticket(queue, "a").state == WAITING
    assert (queue.running, queue.queued) == (2, 1)


def test_waiting_tenants_are_served_in_turn_not_in_arrival_order() -> None:
    queue, _ = fair_queue(slots=1)
    woken: list[str] = []
    ticket(queue, "a")  # runs
    burst = [ticket(queue, "a", woken) for _ in range(4)]
    late = [ticket(queue, "b", woken), ticket(queue, "c", woken), ticket(queue, "b", woken)]
    for _ in range(7):
        queue.leave()
    # a, b, c, a, b, a, a: one per tenant per turn, each tenant's calls in order.
    assert woken == ["a", "b", "c", "a", "b", "a", "a"]
    assert all(t.state == GRANTED for t in [*burst, *late])
    assert (queue.running, queue.queued) == (1, 0)


def test_a_tenant_with_a_full_queue_is_refused_while_others_still_queue() -> None:
    queue, _ = fair_queue(slots=1, queued=10, per_tenant=2)
    ticket(queue, "a")
    ticket(queue, "a")
    ticket(queue, "a")
    assert queue.enter("a") == "tenant_queue_full"
    b = ticket(queue, "b")
    assert b.state == WAITING
    queue.leave()  # a's first waiting call
    queue.leave()  # then b, ahead of a's second
    assert b.state == GRANTED


def test_the_whole_queue_is_bounded_too() -> None:
    queue, _ = fair_queue(slots=1, queued=2, per_tenant=2)
    ticket(queue, "a")
    ticket(queue, "a")
    ticket(queue, "b")
    assert queue.enter("c") == "queue_full"
    assert queue.queued == 2


def test_no_queue_refuses_as_soon_as_every_slot_is_taken() -> None:
    queue, _ = fair_queue(slots=1, queued=0, per_tenant=0)
    ticket(queue, "a")
    assert queue.enter("b") == "tenant_queue_full"


def test_a_waiting_call_expires_at_its_deadline_and_never_gets_a_slot() -> None:
    queue, clock = fair_queue(slots=1, timeout_s=5.0)
    woken: list[str] = []
    ticket(queue, "a")
    early = ticket(queue, "b", woken)
    clock.now = 3.0
    later = ticket(queue, "c", woken)
    clock.now = 5.0
    assert queue.expire() == [early]
    assert early.state == EXPIRED and woken == ["b"]
    clock.now = 7.9
    queue.leave()  # the slot goes to c, still within its deadline
    assert later.state == GRANTED
    assert (queue.running, queue.queued) == (1, 0)


def test_an_expired_call_is_skipped_when_a_slot_frees_up() -> None:
    queue, clock = fair_queue(slots=1, timeout_s=1.0)
    ticket(queue, "a")
    stale = ticket(queue, "b")
    clock.now = 0.5
    fresh = ticket(queue, "c")
    clock.now = 1.2
    queue.leave()
    assert (stale.state, fresh.state) == (EXPIRED, GRANTED)


def test_a_withdrawn_call_leaves_the_queue() -> None:
    queue, _ = fair_queue(slots=1)
    ticket(queue, "a")
    gone = ticket(queue, "b")
    assert queue.withdraw(gone)
    assert queue.queued == 0
    queue.leave()
    assert (queue.running, gone.state) == (0, "withdrawn")
    assert not queue.withdraw(gone)


def test_more_slots_from_a_reload_serve_the_waiting_at_once() -> None:
    queue, _ = fair_queue(slots=1)
    ticket(queue, "a")
    waiting = [ticket(queue, "b"), ticket(queue, "c")]
    queue.configure(AdmissionLimits(3, 10, 10, 5.0))
    assert [t.state for t in waiting] == [GRANTED, GRANTED]
    assert queue.running == 3


# ----------------------------------------------------------- Admission (asyncio)


def upstream(**limits: float) -> Upstream:
    return Upstream("up", "http://up.test/v1", admission=UpstreamAdmission(**limits))  # type: ignore[arg-type]


def gauge(metrics: BrokerMetrics, name: str) -> float:
    return getattr(metrics, name).labels("up")._value.get()  # type: ignore[no-any-return]


async def test_a_call_waits_for_a_slot_and_gets_it_when_one_frees() -> None:
    metrics = BrokerMetrics()
    admission = Admission(AdmissionLimits(), metrics)
    target = upstream(max_concurrent=1)
    order: list[str] = []

    async def call(name: str, hold: asyncio.Event) -> None:
        async with admission.slot(target, name):
            order.append(name)
            await hold.wait()

    first, second = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(call("a", first))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(call("b", second))
    await asyncio.sleep(0)
    assert order == ["a"]
    assert (gauge(metrics, "admission_running"), gauge(metrics, "admission_queued")) == (1, 1)
    first.set()
    await running
    await asyncio.sleep(0)
    assert order == ["a", "b"]
    second.set()
    await waiting
    assert (gauge(metrics, "admission_running"), gauge(metrics, "admission_queued")) == (0, 0)


async def test_a_full_queue_and_a_wait_past_the_deadline_are_server_busy() -> None:
    metrics = BrokerMetrics()
    admission = Admission(AdmissionLimits(), metrics)
    target = upstream(max_concurrent=1, max_queued_per_tenant=1, queue_timeout_s=0.05)
    async with admission.slot(target, "a"):
        waiter = asyncio.create_task(admission.slot(target, "a").__aenter__())
        await asyncio.sleep(0)
        with pytest.raises(ServerBusy) as full:
            async with admission.slot(target, "a"):
                pass
        assert full.value.name == "server_busy"
        assert "already has 1 calls waiting" in full.value.message
        with pytest.raises(ServerBusy) as late:
            await waiter
        assert "no slot came free within 0.05 s" in late.value.message
    rejections = metrics.admission_rejections
    assert rejections.labels("up", "tenant_queue_full")._value.get() == 1
    assert rejections.labels("up", "queue_timeout")._value.get() == 1
    assert (gauge(metrics, "admission_running"), gauge(metrics, "admission_queued")) == (0, 0)


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    metrics = BrokerMetrics()
    admission = Admission(AdmissionLimits(), metrics)
    target = upstream(max_concurrent=1)
    async with admission.slot(target, "a"):
        waiter = asyncio.create_task(admission.slot(target, "b").__aenter__())
        await asyncio.sleep(0)
        assert gauge(metrics, "admission_queued") == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gauge(metrics, "admission_queued") == 0
    assert admission.queue(target).running == 0


async def test_a_lease_released_early_is_released_once() -> None:
    admission = Admission(AdmissionLimits(), BrokerMetrics())
    target = upstream(max_concurrent=1)
    async with admission.slot(target, "a") as lease:
        lease.release()
        assert admission.queue(target).running == 0
        async with admission.slot(target, "b"):
            assert admission.queue(target).running == 1
    assert admission.queue(target).running == 0
