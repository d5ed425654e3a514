"""Retries and failover before the first token: which deployment next, and when (pure).

A call goes to its deployments in `routing.order`. When an attempt fails
before any delta went to the gateway with an error another attempt might not
meet (`retry_reason`), the next attempt goes at once to a deployment this
call has not tried yet (failover); when every one has been tried, it goes
again to the first that may be retried, after a jittered exponential backoff
or the upstream's `retry-after`. The call ends with the last error when the
attempts are used up, when the wait would pass the call's deadline, or when
no deployment is left (its circuit breaker is open, or its admission queue
refused the call: a busy upstream is never retried, only failed over).

`Attempts` reads no clock and draws no random numbers of its own: `now` and
`draw` are passed in, so tests replay any sequence.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchboard.errors import SwitchboardError
from switchboard.v1 import common_pb2

_REASONS_BY_CODE: dict[int, str] = {
    common_pb2.ERROR_CODE_UPSTREAM_RATE_LIMITED: "rate_limited",
    common_pb2.ERROR_CODE_UPSTREAM_TIMEOUT: "timeout",
    common_pb2.ERROR_CODE_UPSTREAM_STREAM_BROKEN: "stream_broken",
    common_pb2.ERROR_CODE_SERVER_BUSY: "server_busy",
}
# The reasons that count against a deployment's circuit breaker (a full
# admission queue is this broker's own state, not the upstream's).
BREAKER_REASONS = frozenset(
    {"rate_limited", "server_error", "connection", "timeout", "stream_broken"}
)


class TransientUpstreamError(SwitchboardError):
    """An `upstream_error` another attempt might not meet: a 5xx, 408, 409 or no connection.

    Attributes:
        reason: `server_error` or `connection` (a metric label).
    """

    code = common_pb2.ERROR_CODE_UPSTREAM_ERROR

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def retry_reason(error: SwitchboardError) -> str | None:
    """Why another attempt might succeed where this one failed; None if it would not.

    One of rate_limited, server_error, connection, timeout, stream_broken,
    server_busy (see `switchboard.broker.metrics.RETRY_REASONS`).
    """
    if isinstance(error, TransientUpstreamError):
        return error.reason
    return _REASONS_BY_CODE.get(int(error.code))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one call tries before its first token.

    Attributes:
        attempts: attempts in all, the first and failovers included (>= 1).
        backoff_s: the first backoff; each further one doubles, up to `backoff_max_s`.
        backoff_max_s: the longest backoff.
        deadline_s: from the call's start, no wait may end and no attempt may
            start after this.
    """

    attempts: int = 3
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    deadline_s: float = 15.0

    def backoff(self, retry: int, draw: float) -> float:
        """The wait before backoff retry number `retry` (1, 2, ...), with equal jitter.

        Half of the exponential step is fixed and half uniformly random, so
        calls that failed together do not come back together.
        """
        step = min(self.backoff_max_s, self.backoff_s * 2.0 ** (retry - 1))
        return step / 2 + step / 2 * draw


@dataclass(frozen=True, slots=True)
class Step:
    """The next attempt: which deployment, after how long a wait (seconds)."""

    upstream: str
    delay: float = 0.0


class Attempts:
    """The attempts of one call; see the module docstring for the rules.

    Call order: `next(now, available)` for the first attempt; after each
    failure before the first token, `failed(upstream, error, reason)`, then
    `next` again. `blocked(upstream)` when a breaker refused the step's
    deployment at the last moment. `next` returning None means: end the call
    with `last_error` (or, if nothing was tried, the deployments are all
    unavailable).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        upstreams: Sequence[str],
        *,
        started: float,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """Args:
        policy: attempts, backoff and deadline.
        upstreams: the call's deployments by upstream name, in `routing.order`.
        started: when the call started (the clock `now` comes from).
        draw: uniform numbers in [0, 1) for the jitter.
        """
        self.policy = policy
        self.upstreams = list(upstreams)
        self.deadline = started + policy.deadline_s
        self._draw = draw
        self.made = 0
        self.backoffs = 0
        self.last_error: SwitchboardError | None = None
        # Upstream -> the reason of its last failure in this call.
        self._failed: dict[str, str] = {}
        self._retry_after: dict[str, float] = {}
        self._blocked: set[str] = set()

    def next(self, now: float, available: Callable[[str], bool]) -> Step | None:
        """The next attempt, or None when the call must end.

        Args:
            now: the current time.
            available: whether a deployment's circuit breaker would let a call
                through (asked only of deployments that could be next).
        """
        if self.made >= self.policy.attempts:
            return None
        for upstream in self.upstreams:
            tried = upstream in self._failed or upstream in self._blocked
            if not tried and available(upstream):
                return Step(upstream)
        if self.last_error is None:
            return None
        for upstream in self.upstreams:
            reason = self._failed.get(upstream)
            if reason in (None, "server_busy") or upstream in self._blocked:
                continue
            delay = self._retry_after.get(upstream)
            if delay is None:
                delay = self.policy.backoff(self.backoffs + 1, self._draw())
            if now + delay > self.deadline or not available(upstream):
                continue
            return Step(upstream, delay)
        return None

    def begin(self, step: Step) -> None:
        """The attempt of `step` starts (after its wait)."""
        self.made += 1
        if step.delay:
            self.backoffs += 1

    def failed(self, upstream: str, error: SwitchboardError, reason: str) -> None:
        """The attempt on `upstream` failed before the first token, for `reason`."""
        self.last_error = error
        self._failed[upstream] = reason
        if reason == "rate_limited" and error.retry_after is not None:
            self._retry_after[upstream] = error.retry_after
        else:
            self._retry_after.pop(upstream, None)

    def blocked(self, upstream: str) -> None:
        """`upstream`'s breaker refused the attempt: leave it out from now on."""
        self._blocked.add(upstream)
