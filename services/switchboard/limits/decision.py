"""What a limit check answers: decisions, rate-limit state, and refusal errors.

A refused `Decision` becomes the error to raise with `Decision.error()`; a
`RateLimitState` becomes the `rate_limits` list of a Realtime
`rate_limits.updated` event with `to_event()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switchboard.errors import ServiceUnavailable, SwitchboardError, code_name
from switchboard.v1 import common_pb2

# What `usage()` and `Decision` report for a limit that is not set: a number,
# because Realtime events never carry nulls, and one every client can hold (int32).
UNLIMITED = 2**31 - 1
RATE_LIMIT_EXCEEDED = code_name(common_pb2.ERROR_CODE_RATE_LIMIT_EXCEEDED)
INSUFFICIENT_QUOTA = code_name(common_pb2.ERROR_CODE_INSUFFICIENT_QUOTA)


class LimitsStoreUnavailable(ServiceUnavailable):
    """The limits store (Redis) did not answer: refuse, and let the client retry."""


class RateLimitExceeded(SwitchboardError):
    """A tenant is over a requests, tokens or concurrency limit; retry later."""

    code = common_pb2.ERROR_CODE_RATE_LIMIT_EXCEEDED


class QuotaExceeded(SwitchboardError):
    """A tenant has spent its daily token budget."""

    code = common_pb2.ERROR_CODE_INSUFFICIENT_QUOTA


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one admission question.

    Attributes:
        allowed: whether the request, slot or reservation was granted (and counted).
        limit: the limit the answer is about; `UNLIMITED` when none is set.
        remaining: what is left of `limit` after this call, never negative.
        retry_after_s: when refused, seconds until asking again can succeed
            (0.0 when allowed).
        code: None when allowed, else the error code to refuse with:
            `rate_limit_exceeded` or `insufficient_quota`.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    code: str | None

    def error(self, message: str) -> RateLimitExceeded | QuotaExceeded:
        """The error to refuse with, carrying `retry_after_s`.

        Args:
            message: safe to show the client, e.g. which limit was reached.

        Raises:
            ValueError: the decision allowed the request.
        """
        if self.code == INSUFFICIENT_QUOTA:
            return QuotaExceeded(message, retry_after=self.retry_after_s)
        if self.code == RATE_LIMIT_EXCEEDED:
            return RateLimitExceeded(message, retry_after=self.retry_after_s)
        raise ValueError("an allowed decision is not an error")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One entry of a Realtime `rate_limits.updated` event.

    Attributes:
        name: `requests` or `tokens`.
        limit: per minute; `UNLIMITED` when none is set.
        remaining: what the tenant may still use now (reserved tokens count as used).
        reset_seconds: seconds until `remaining` is back to `limit` if nothing more
            is used; 0.0 when nothing is used or the limit is not set.
    """

    name: str
    limit: int
    remaining: int
    reset_seconds: float

    def to_event(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limit": self.limit,
            "remaining": self.remaining,
            "reset_seconds": self.reset_seconds,
        }


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """A tenant's per-minute limits as the gateway reports them; never any None."""

    requests: RateLimit
    tokens: RateLimit

    def to_event(self) -> list[dict[str, Any]]:
        """The `rate_limits` list of a `rate_limits.updated` event."""
        return [self.requests.to_event(), self.tokens.to_event()]
