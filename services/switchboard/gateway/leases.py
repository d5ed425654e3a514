"""The session writer leases of all the gateway's connections, renewed together.

A connection that writes a session's event log (a Realtime WebSocket, an SSE
stream) holds the session's writer lease (eventlog.py) and must renew it well
within the lease, or a resume elsewhere may take the session. Renewed one by
one, that is a unary call per connection per second, idle or not: a gateway
with a thousand idle connections would spend most of a core, and the session
service as much, on leases alone. `LeaseRenewals` renews every lease held
through it with one `ClaimSessionsBatch` per tick instead (every `lease_s / 3`,
at most 1 s: the interval a connection renewed at on its own), and hands each
connection its own outcome:

- `False`: renewed; `True`: renewed, and another connection asked for the
  session (hand it over after the running response);
- `SessionTakenOver`: the lease lapsed and another connection holds it now;
- any other `SwitchboardError`: the session is gone (`session_not_found`), or
  the renewal failed (the session service or Redis: the next tick tries again).

The same tick runs each connection's `every_tick` callback (its idle and
session-length timers), so a connection keeps no timer task of its own.

A gateway that dies stops renewing, so its leases lapse within the lease as
before. A connection that ends `drop`s its lease before it releases it, so no
renewal still in flight can take the lease again after the release.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from switchboard.errors import SessionTakenOver, SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.eventlog import SessionWriter, batch_error
from switchboard.v1 import session_pb2

log = logging.getLogger(__name__)

# What a renewal got: whether a hand-over was asked for, or its error.
Outcome = bool | SwitchboardError


def _always() -> bool:
    return True


class Lease:
    """One connection's lease in the gateway's renewals; see `LeaseRenewals.hold`."""

    def __init__(
        self,
        renewals: LeaseRenewals,
        claim: session_pb2.ClaimSessionRequest,
        on_renewed: Callable[[Outcome], None],
        due: Callable[[], bool],
        every_tick: Callable[[], None] | None,
    ) -> None:
        self.renewals = renewals
        self.claim = claim
        self.on_renewed = on_renewed
        self.due = due
        self.every_tick = every_tick
        self.flight: asyncio.Future[None] | None = None  # the renewal in flight, if any

    def stop(self) -> None:
        """Renew no more, and hand over no outcome of a renewal in flight."""
        self.renewals._held.pop(self, None)

    async def drop(self) -> None:
        """`stop`, then wait until no renewal of this lease is in flight (the
        connection may then release the lease)."""
        self.stop()
        if self.flight is not None:
            await asyncio.shield(self.flight)


class LeaseRenewals:
    """Renews the session writer leases of all the gateway's connections; see the
    module docstring."""

    def __init__(self, backends: Backends, lease_s: float, *, max_batch: int = 1000) -> None:
        """Args:
        backends: the session service.
        lease_s: how long a lease lasts unless renewed (`session_lease_s`).
        max_batch: claims per call; more leases go out in several calls at once.
        """
        self.backends = backends
        self.lease_ms = int(lease_s * 1000)
        self.interval_s = min(lease_s / 3, 1.0)
        self.max_batch = max_batch
        self._held: dict[Lease, None] = {}  # insertion-ordered set
        self._task: asyncio.Task[None] | None = None

    def hold(
        self,
        writer: SessionWriter,
        on_renewed: Callable[[Outcome], None],
        *,
        due: Callable[[], bool] = _always,
        every_tick: Callable[[], None] | None = None,
    ) -> Lease:
        """Renew `writer`'s lease every tick until the lease is stopped or dropped.

        Args:
            on_renewed: called with each renewal's outcome (see the module
                docstring); it must not block. It may `stop` the lease.
            due: asked at each tick; False skips this tick's renewal (a
                connection whose appends renew the lease).
            every_tick: called at each tick (at most `interval_s` apart) before
                `due`, while the lease is held; it must not block.
        """
        claim = session_pb2.ClaimSessionRequest(
            tenant_id=writer.tenant_id,
            session_id=writer.session_id,
            holder=writer.holder,
            lease_ms=writer.lease_ms,
        )
        lease = Lease(self, claim, on_renewed, due, every_tick)
        self._held[lease] = None
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return lease

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self._held:
                # Nothing to renew: stop ticking (`hold` starts again).
                self._task = None
                return
            self._run_ticks()
            try:
                due = [lease for lease in self._held if lease.due()]
                chunks = [due[n : n + self.max_batch] for n in range(0, len(due), self.max_batch)]
                await asyncio.gather(*(self._renew(chunk) for chunk in chunks))
            except Exception:
                # A bug must not stop every lease of the gateway from being renewed.
                log.exception("lease renewals failed")

    def _run_ticks(self) -> None:
        for lease in list(self._held):
            if lease.every_tick is None or lease not in self._held:
                continue
            _guarded(lease, "tick not handled", lease.every_tick)

    async def _renew(self, leases: list[Lease]) -> None:
        """One `ClaimSessionsBatch` for `leases`; each gets its own outcome."""
        flight = asyncio.get_running_loop().create_future()
        for lease in leases:
            lease.flight = flight
        try:
            outcomes = await self._claim([lease.claim for lease in leases])
        finally:
            flight.set_result(None)
            for lease in leases:
                lease.flight = None
        for lease, outcome in zip(leases, outcomes, strict=True):
            if lease not in self._held:
                continue  # stopped or dropped meanwhile
            _guarded(
                lease, "lease outcome not handled", functools.partial(lease.on_renewed, outcome)
            )

    async def _claim(self, claims: list[session_pb2.ClaimSessionRequest]) -> list[Outcome]:
        try:
            reply = await self.backends.claim_sessions_batch(claims)
        except SwitchboardError as error:
            return [error] * len(claims)
        outcomes: list[Outcome] = []
        for result in reply.results:
            if result.error_code:
                outcomes.append(
                    batch_error(result.error_code, result.error_message, result.error_param)
                )
            elif not result.claim.claimed:
                outcomes.append(SessionTakenOver("Another connection resumed this session."))
            else:
                outcomes.append(result.claim.handoff_requested)
        if len(outcomes) != len(claims):  # a session service that broke the contract
            wrong = SwitchboardError("The session service answered the wrong number of claims.")
            return [wrong] * len(claims)
        return outcomes


def _guarded(lease: Lease, what: str, callback: Callable[[], None]) -> None:
    """Run one connection's callback: its bug is logged (`what`), and must not
    stop the other connections' ticks or renewals."""
    try:
        callback()
    except Exception:
        log.exception(
            what,
            extra={"tenant_id": lease.claim.tenant_id, "session_id": lease.claim.session_id},
        )
