"""Retry policy, failover order and deployment order, with explicit clocks and draws."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest

from switchboard.broker.retry import (
    Attempts,
    RetryPolicy,
    Step,
    TransientUpstreamError,
    retry_reason,
)
from switchboard.broker.routing import Candidate, order
from switchboard.errors import (
    InvalidRequest,
    ServerBusy,
    SwitchboardError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from switchboard.tenancy import Upstream

POLICY = RetryPolicy(attempts=4, backoff_s=0.5, backoff_max_s=4.0, deadline_s=10.0)
FIVE_HUNDRED = TransientUpstreamError("The upstream failed (HTTP 500).", reason="server_error")


def always(_upstream: str) -> bool:
    return True


def attempts(*upstreams: str, policy: RetryPolicy = POLICY, draw: float = 0.0) -> Attempts:
    return Attempts(policy, upstreams, started=0.0, draw=lambda: draw)


def fail(plan: Attempts, step: Step | None, error: SwitchboardError) -> None:
    assert step is not None
    plan.begin(step)
    reason = retry_reason(error)
    assert reason is not None
    plan.failed(step.upstream, error, reason)


def test_backoff_doubles_up_to_the_ceiling_with_equal_jitter() -> None:
    assert [POLICY.backoff(n, 0.0) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [POLICY.backoff(n, 1.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UpstreamRateLimited("429", retry_after=1.0), "rate_limited"),
        (FIVE_HUNDRED, "server_error"),
        (TransientUpstreamError("The upstream is unreachable.", reason="connection"), "connection"),
        (UpstreamTimeout("slow"), "timeout"),
        (UpstreamStreamBroken("cut"), "stream_broken"),
        (ServerBusy("full"), "server_busy"),
        (UpstreamError("The upstream rejected the configured credentials."), None),
        (UpstreamError("The upstream refused the request (HTTP 400)."), None),
        (InvalidRequest("bad tools"), None),
    ],
)
def test_which_errors_another_attempt_might_not_meet(
    error: SwitchboardError, reason: str | None
) -> None:
    assert retry_reason(error) == reason


def test_a_failure_fails_over_at_once_then_backs_off_on_the_first_deployment() -> None:
    plan = attempts("east", "west")
    first = plan.next(0.0, always)
    assert first == Step("east")
    fail(plan, first, FIVE_HUNDRED)
    failover = plan.next(0.1, always)
    assert failover == Step("west", 0.0)
    fail(plan, failover, FIVE_HUNDRED)
    retry = plan.next(0.2, always)
    assert retry == Step("east", 0.25)  # the first backoff, with the smallest jitter
    fail(plan, retry, FIVE_HUNDRED)
    assert plan.next(0.6, always) == Step("east", 0.5)  # the second backoff doubles


def test_attempts_are_bounded() -> None:
    plan = attempts("only", policy=RetryPolicy(attempts=2, deadline_s=100.0))
    fail(plan, plan.next(0.0, always), FIVE_HUNDRED)
    fail(plan, plan.next(1.0, always), FIVE_HUNDRED)
    assert plan.next(2.0, always) is None
    assert plan.last_error is FIVE_HUNDRED


def test_retry_after_is_honoured_and_one_past_the_deadline_ends_the_call_at_once() -> None:
    plan = attempts("only")
    fail(plan, plan.next(0.0, always), UpstreamRateLimited("429", retry_after=2.0))
    step = plan.next(0.0, always)
    assert step == Step("only", 2.0)
    limited = UpstreamRateLimited("429, retry after 30 s", retry_after=30.0)
    fail(plan, step, limited)
    # 2 + 30 passes the 10 s deadline: no wait at all, the 429 is the answer.
    assert plan.next(2.0, always) is None
    assert plan.last_error is limited and limited.retry_after == 30.0


def test_a_rate_limited_deployment_is_failed_over_before_its_retry_after() -> None:
    plan = attempts("east", "west")
    fail(plan, plan.next(0.0, always), UpstreamRateLimited("429", retry_after=60.0))
    assert plan.next(0.0, always) == Step("west")


def test_no_backoff_wait_may_pass_the_deadline() -> None:
    plan = attempts("only", policy=RetryPolicy(attempts=9, backoff_s=4.0, deadline_s=3.0))
    fail(plan, plan.next(0.0, always), FIVE_HUNDRED)
    assert plan.next(0.5, always) == Step("only", 2.0)
    assert plan.next(1.5, always) is None  # the 2 s backoff would end after the 3 s


def test_a_busy_upstream_is_failed_over_but_never_retried() -> None:
    plan = attempts("east", "west")
    fail(plan, plan.next(0.0, always), ServerBusy("full"))
    step = plan.next(0.0, always)
    assert step == Step("west")
    fail(plan, step, FIVE_HUNDRED)
    assert plan.next(0.0, always) == Step("west", 0.25)
    single = attempts("only")
    fail(single, single.next(0.0, always), ServerBusy("full"))
    assert single.next(0.0, always) is None


def test_open_breakers_are_skipped_and_all_open_ends_before_any_attempt() -> None:
    open_east = {"east": False, "west": True}
    plan = attempts("east", "west")
    assert plan.next(0.0, open_east.__getitem__) == Step("west")
    nothing = attempts("east", "west")
    assert nothing.next(0.0, lambda _name: False) is None
    assert nothing.last_error is None  # nothing was tried: the breakers are the reason


def test_a_deployment_blocked_at_the_last_moment_is_left_out() -> None:
    plan = attempts("east", "west")
    step = plan.next(0.0, always)
    assert step == Step("east")
    plan.blocked("east")
    assert plan.next(0.0, always) == Step("west")


# ----------------------------------------------------------- deployment order


def candidate(name: str, weight: int = 1, priority: int = 0) -> Candidate:
    return Candidate(Upstream(name, f"http://{name}.test/v1"), "m", weight, priority)


def draws(*values: float) -> Iterator[float]:
    return iter(values)


def test_lower_priorities_come_first_whatever_the_weights() -> None:
    candidates = [candidate("backup", 100, priority=1), candidate("main", 1), candidate("also", 1)]
    sequence = draws(0.99, 0.1, 0.9)
    ordered = order(candidates, lambda: next(sequence))
    assert [c.upstream.name for c in ordered] == ["also", "main", "backup"]


def test_weights_share_the_first_place() -> None:
    candidates = [candidate("heavy", 3), candidate("light", 1)]
    rng = random.Random(7)
    firsts = Counter(order(candidates, rng.random)[0].upstream.name for _ in range(4000))
    assert 0.70 < firsts["heavy"] / 4000 < 0.80
