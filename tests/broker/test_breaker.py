"""The circuit breaker's states, driven by an explicit clock."""

from __future__ import annotations

from switchboard.broker.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerDefaults,
    Breakers,
    CircuitBreaker,
)
from switchboard.broker.metrics import BrokerMetrics
from switchboard.tenancy import Upstream, UpstreamBreaker


def breaker(failures: int = 3, cooldown_s: float = 10.0) -> tuple[CircuitBreaker, list[str]]:
    changes: list[str] = []
    return CircuitBreaker(failures, cooldown_s, on_change=changes.append), changes


def test_it_opens_after_n_consecutive_failures_only() -> None:
    b, changes = breaker(failures=3)
    b.failed(0.0)
    b.failed(1.0)
    b.succeeded()  # a success starts the count over
    b.failed(2.0)
    b.failed(3.0)
    assert b.state == CLOSED and b.allow(3.0)
    b.failed(4.0)
    assert b.state == OPEN
    assert changes == [OPEN]
    assert not b.available(4.0) and not b.allow(13.9)
    assert b.reopens_in(4.0) == 10.0


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes() -> None:
    b, changes = breaker(failures=1, cooldown_s=10.0)
    b.failed(0.0)
    assert b.available(10.0)
    assert b.allow(10.0)  # the probe
    assert b.state == HALF_OPEN
    # Only the probe, until it reports.
    assert not b.available(10.5) and not b.allow(10.5)
    b.succeeded()
    assert b.state == CLOSED and b.allow(10.6) and b.allow(10.6)
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    b, changes = breaker(failures=2, cooldown_s=5.0)
    b.failed(0.0)
    b.failed(0.0)
    assert b.allow(5.0)
    b.failed(6.0)
    assert b.state == OPEN
    assert not b.allow(10.9)
    assert b.allow(11.0)
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    b, _ = breaker(failures=1, cooldown_s=1.0)
    b.failed(0.0)
    assert b.allow(1.0)
    b.abandoned()
    assert b.state == HALF_OPEN
    assert b.allow(1.0)


def test_an_abandoned_call_changes_nothing_while_closed() -> None:
    b, changes = breaker(failures=2)
    b.failed(0.0)
    b.abandoned()
    assert (b.state, b.failures, changes) == (CLOSED, 1, [])


def test_late_reports_of_calls_started_before_it_opened_do_not_extend_the_cooldown() -> None:
    b, _ = breaker(failures=1, cooldown_s=10.0)
    b.failed(0.0)
    b.failed(9.0)  # a call that was in flight when it opened
    b.succeeded()  # and another one: only the probe may close it
    assert b.state == OPEN
    assert b.allow(10.0)


def test_the_registry_applies_the_upstreams_settings_and_exports_the_state() -> None:
    metrics = BrokerMetrics()
    now = [0.0]
    breakers = Breakers(BreakerDefaults(failures=5, cooldown_s=30.0), metrics, lambda: now[0])
    east = Upstream("east", "http://east.test/v1", circuit_breaker=UpstreamBreaker(failures=2))
    first = breakers.get(east)
    assert (first.threshold, first.cooldown_s) == (2, 30.0)
    assert breakers.get(east) is first

    def state(value: str) -> float:
        return metrics.breaker_state.labels("east", value)._value.get()  # type: ignore[no-any-return]

    assert (state("closed"), state("open")) == (1, 0)
    first.failed(0.0)
    first.failed(0.0)
    assert (state("closed"), state("open"), state("half_open")) == (0, 1, 0)
    assert metrics.breaker_transitions.labels("east", "open")._value.get() == 1
    # A reload that changes the settings keeps the state.
    reloaded = Upstream("east", "http://east.test/v1", circuit_breaker=UpstreamBreaker(3, 1.0))
    assert breakers.get(reloaded) is first
    assert (first.threshold, first.cooldown_s, first.state) == (3, 1.0, OPEN)
