"""Circuit breakers: stop sending calls to an upstream deployment that keeps failing.

`CircuitBreaker` is the state machine of one deployment and reads no clock of
its own: every method that depends on time takes `now` (seconds, monotonic).

    closed ──N consecutive failures──▶ open ──cooldown passed──▶ half_open
      ▲                                 ▲                          │ one probe call
      └────────── probe succeeded ──────┼──────────────────────────┤
                                        └────── probe failed ──────┘

Call order for one call: `allow(now)` before sending (False: skip this
deployment), then exactly one of `succeeded()` (the upstream answered),
`failed(now)` (a failure another attempt might not meet) or `abandoned()`
(the call ended without telling: cancelled, or refused by admission control).
`available(now)` answers the same question as `allow` without changing anything.

`Breakers` keeps one breaker per upstream name, with the upstream's settings
from the tenants file over the broker's defaults, and reports state changes
to the metrics and the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from switchboard.broker.metrics import BrokerMetrics
from switchboard.tenancy import Upstream

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """The breaker of one deployment; see the module docstring for the states.

    Attributes:
        state: closed, open or half_open.
        failures: consecutive failures counted while closed.
    """

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        *,
        on_change: Callable[[str], None] = lambda _state: None,
    ) -> None:
        """Args:
        failures: consecutive failures that open the breaker (>= 1).
        cooldown_s: how long it stays open before one probe is let through.
        on_change: called with the new state after every transition.
        """
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._on_change = on_change

    def configure(self, failures: int, cooldown_s: float) -> None:
        """New settings (a tenants file reload); the current state is kept."""
        self.threshold, self.cooldown_s = failures, cooldown_s

    def available(self, now: float) -> bool:
        """Whether `allow(now)` would let a call through (changes nothing)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self._opened_at + self.cooldown_s
        return not self._probing

    def allow(self, now: float) -> bool:
        """Whether a call may go to the deployment now; half-opens after the cooldown.

        In half_open only one call (the probe) is let through until it reports.
        """
        if not self.available(now):
            return False
        if self.state == OPEN:
            self._enter(HALF_OPEN)
        if self.state == HALF_OPEN:
            self._probing = True
        return True

    def reopens_in(self, now: float) -> float:
        """Seconds until a call may be let through again (0 when one may now)."""
        if self.state == OPEN:
            return max(self._opened_at + self.cooldown_s - now, 0.0)
        return 0.0

    def succeeded(self) -> None:
        """The upstream answered: a probe closes the breaker; failures start over."""
        self.failures = 0
        if self.state == HALF_OPEN:
            self._probing = False
            self._enter(CLOSED)

    def failed(self, now: float) -> None:
        """A failure another attempt might not meet (429, 5xx, no connection, ...)."""
        if self.state == HALF_OPEN:
            self._open(now)
        elif self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(now)
        # Open: a call that started before the breaker opened; the cooldown stands.

    def abandoned(self) -> None:
        """The call ended without a verdict; a probe's place goes to the next call."""
        if self.state == HALF_OPEN:
            self._probing = False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probing = False
        self.failures = 0
        self._enter(OPEN)

    def _enter(self, state: str) -> None:
        self.state = state
        self._on_change(state)


@dataclass(frozen=True, slots=True)
class BreakerDefaults:
    """The broker's breaker settings for upstreams whose tenants file sets none."""

    failures: int = 5
    cooldown_s: float = 30.0


class Breakers:
    """One `CircuitBreaker` per upstream name, created on first use."""

    def __init__(
        self,
        defaults: BreakerDefaults,
        metrics: BrokerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._defaults = defaults
        self._metrics = metrics
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, upstream: Upstream) -> CircuitBreaker:
        """The breaker of `upstream`, with its current settings."""
        settings = upstream.circuit_breaker
        failures = settings.failures or self._defaults.failures
        cooldown_s = settings.cooldown_s or self._defaults.cooldown_s
        breaker = self._breakers.get(upstream.name)
        if breaker is None:
            name = upstream.name
            breaker = CircuitBreaker(
                failures, cooldown_s, on_change=lambda state: self._changed(name, state)
            )
            self._breakers[name] = breaker
            self._metrics.set_breaker_state(name, CLOSED)
        elif (breaker.threshold, breaker.cooldown_s) != (failures, cooldown_s):
            breaker.configure(failures, cooldown_s)
        return breaker

    def _changed(self, upstream: str, state: str) -> None:
        self._metrics.set_breaker_state(upstream, state)
        self._metrics.breaker_transitions.labels(upstream, state).inc()
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(level, f"circuit breaker {state}", extra={"upstream": upstream, "state": state})
