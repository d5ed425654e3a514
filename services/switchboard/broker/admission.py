"""Admission control: bounded concurrency per upstream, with a fair, bounded wait.

`FairQueue` is the scheduler of one upstream and does no I/O; its clock is
injected. It hands out at most `max_concurrent` slots. A call that finds them
all taken waits in its tenant's own queue; when a slot frees up, the tenants
with waiting calls are served in turn (round robin), so a burst from one
tenant cannot starve the others. A call is refused at once (`server_busy`)
when its tenant already has `max_queued_per_tenant` calls waiting, or when
`max_queued` calls wait in all; one that waits past `queue_timeout_s` is
refused too.

`Admission` drives one `FairQueue` per upstream name on the event loop:
`async with admission.slot(upstream, tenant_id) as lease:` holds a slot for
the block (or until `lease.release()`), and keeps the queue-depth gauges current.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NoReturn

from switchboard.broker.metrics import BrokerMetrics
from switchboard.errors import ServerBusy
from switchboard.tenancy import Upstream

WAITING, GRANTED, EXPIRED, WITHDRAWN = "waiting", "granted", "expired", "withdrawn"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The admission settings of one upstream.

    Attributes:
        max_concurrent: slots: calls streaming at once (>= 1).
        max_queued: calls waiting, all tenants together (>= 0).
        max_queued_per_tenant: calls one tenant may have waiting (>= 0).
        queue_timeout_s: the longest a call waits for a slot.
    """

    max_concurrent: int = 64
    max_queued: int = 256
    max_queued_per_tenant: int = 32
    queue_timeout_s: float = 10.0

    def over(self, upstream: Upstream) -> AdmissionLimits:
        """These limits with the ones `upstream`'s tenants file entry sets."""
        own = upstream.admission

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        return AdmissionLimits(
            max_concurrent=int(pick(own.max_concurrent, self.max_concurrent)),
            max_queued=int(pick(own.max_queued, self.max_queued)),
            max_queued_per_tenant=int(pick(own.max_queued_per_tenant, self.max_queued_per_tenant)),
            queue_timeout_s=pick(own.queue_timeout_s, self.queue_timeout_s),
        )


@dataclass(eq=False, slots=True)
class Ticket:
    """One call's place: granted at once, or waiting until `deadline`.

    Attributes:
        tenant: whose call it is.
        deadline: when a waiting ticket expires (the queue's clock).
        state: waiting, granted, expired or withdrawn.
        wake: called once when a waiting ticket is granted or expires.
    """

    tenant: str
    deadline: float
    state: str = WAITING
    wake: Callable[[], None] = field(default=lambda: None, repr=False)


class FairQueue:
    """Slots of one upstream and the tenants' queues for them (no I/O).

    Call order: `enter(tenant)` per call; a waiting ticket ends as granted
    (its `wake` runs), expired (`expire` or a grant found it late), or
    withdrawn (`withdraw`, when its caller gives up). Every granted ticket
    must be paired with one `leave()` when its call ends.
    """

    def __init__(
        self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.running = 0
        self.queued = 0
        # Tenants with waiting tickets, in the order they are served next.
        self._queues: OrderedDict[str, deque[Ticket]] = OrderedDict()

    def enter(self, tenant: str) -> Ticket | str:
        """A slot, a place in the tenant's queue, or the reason for refusing.

        Returns:
            A granted or waiting `Ticket`, or `queue_full` / `tenant_queue_full`.
        """
        now = self.clock()
        self.expire()
        ticket = Ticket(tenant, now + self.limits.queue_timeout_s)
        if self.running < self.limits.max_concurrent and not self.queued:
            ticket.state = GRANTED
            self.running += 1
            return ticket
        if len(self._queues.get(tenant, ())) >= self.limits.max_queued_per_tenant:
            return "tenant_queue_full"
        if self.queued >= self.limits.max_queued:
            return "queue_full"
        self._queues.setdefault(tenant, deque()).append(ticket)
        self.queued += 1
        return ticket

    def leave(self) -> None:
        """A granted call ended: its slot goes to the next tenant in turn."""
        self.running -= 1
        self._grant()

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out (its caller gave up). False if it was granted already."""
        if ticket.state != WAITING:
            return False
        self._queues[ticket.tenant].remove(ticket)
        if not self._queues[ticket.tenant]:
            del self._queues[ticket.tenant]
        self.queued -= 1
        ticket.state = WITHDRAWN
        return True

    def expire(self) -> list[Ticket]:
        """Take out every waiting ticket past its deadline, waking each."""
        now = self.clock()
        expired: list[Ticket] = []
        for tenant in list(self._queues):
            waiting = self._queues[tenant]
            # Each queue is in arrival order with one timeout, so deadlines ascend.
            while waiting and waiting[0].deadline <= now:
                expired.append(waiting.popleft())
            if not waiting:
                del self._queues[tenant]
        for ticket in expired:
            self.queued -= 1
            ticket.state = EXPIRED
            ticket.wake()
        return expired

    def configure(self, limits: AdmissionLimits) -> None:
        """New limits (a tenants file reload): more slots are handed out at once.

        Calls already waiting or running keep their places.
        """
        self.limits = limits
        self._grant()

    def _grant(self) -> None:
        self.expire()
        while self._queues and self.running < self.limits.max_concurrent:
            tenant, waiting = next(iter(self._queues.items()))
            ticket = waiting.popleft()
            if waiting:
                self._queues.move_to_end(tenant)  # the tenant's next call waits its turn
            else:
                del self._queues[tenant]
            self.queued -= 1
            self.running += 1
            ticket.state = GRANTED
            ticket.wake()


class Lease:
    """A slot held by one call; `release()` gives it back, once however often it is called."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Admission:
    """Admission control of every upstream this broker calls, by upstream name."""

    def __init__(
        self,
        defaults: AdmissionLimits,
        metrics: BrokerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        defaults: the limits of upstreams whose tenants file entry sets none.
        metrics: gets the queue depth, running calls and rejections.
        clock: monotonic seconds.
        """
        self._defaults = defaults
        self._metrics = metrics
        self._clock = clock
        self._queues: dict[str, FairQueue] = {}

    def queue(self, upstream: Upstream) -> FairQueue:
        """The scheduler of `upstream`, with its current limits."""
        limits = self._defaults.over(upstream)
        queue = self._queues.get(upstream.name)
        if queue is None:
            queue = self._queues[upstream.name] = FairQueue(limits, self._clock)
        elif queue.limits != limits:
            queue.configure(limits)
            self._report(upstream.name, queue)
        return queue

    @contextlib.asynccontextmanager
    async def slot(self, upstream: Upstream, tenant_id: str) -> AsyncIterator[Lease]:
        """Hold one of `upstream`'s slots for the block, waiting for one if need be.

        The `Lease` may be released early from synchronous code (a gRPC done
        callback); leaving the block releases it otherwise.

        Raises:
            ServerBusy: the queue is full, or no slot came within the queue timeout.
        """
        name = upstream.name
        queue = self.queue(upstream)
        ticket = queue.enter(tenant_id)
        if isinstance(ticket, str):
            self._refuse(name, queue, ticket)
        self._report(name, queue)
        if ticket.state == WAITING:
            try:
                await self._wait(name, queue, ticket)
            finally:
                self._report(name, queue)
        lease = Lease(lambda: self._leave(name, queue))
        try:
            yield lease
        finally:
            lease.release()

    def _leave(self, name: str, queue: FairQueue) -> None:
        queue.leave()
        self._report(name, queue)

    async def _wait(self, name: str, queue: FairQueue, ticket: Ticket) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        ticket.wake = wake
        try:
            async with asyncio.timeout(max(ticket.deadline - self._clock(), 0.0)):
                await woken
        except TimeoutError:
            if ticket.state == WAITING:
                queue.withdraw(ticket)
                ticket.state = EXPIRED
        except BaseException:
            # Cancelled while waiting: give the place (or a slot granted meanwhile) back.
            if not queue.withdraw(ticket) and ticket.state == GRANTED:
                queue.leave()
            raise
        if ticket.state == EXPIRED:
            self._refuse(name, queue, "queue_timeout")

    def _refuse(self, name: str, queue: FairQueue, reason: str) -> NoReturn:
        self._metrics.admission_rejections.labels(name, reason).inc()
        self._report(name, queue)
        limits = queue.limits
        if reason == "queue_timeout":
            detail = f"no slot came free within {limits.queue_timeout_s:g} s"
        elif reason == "tenant_queue_full":
            detail = f"this tenant already has {limits.max_queued_per_tenant} calls waiting"
        else:
            detail = f"{limits.max_queued} calls are waiting"
        raise ServerBusy(
            f"The upstream '{name}' is at capacity ({limits.max_concurrent} calls "
            f"streaming; {detail}); retry later.",
            retry_after=1.0,
        )

    def _report(self, name: str, queue: FairQueue) -> None:
        self._metrics.admission_queued.labels(name).set(queue.queued)
        self._metrics.admission_running.labels(name).set(queue.running)
