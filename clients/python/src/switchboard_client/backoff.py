"""Full-jitter exponential backoff (as AWS and Centrifugo's SDKs do it).

The n-th retry in a row waits a uniformly random time between 0 and
`min(max_s, base_s * 2**n)`: clients cut at the same moment (a gateway killed
or drained) spread their reconnects instead of arriving together. A delay the
server suggests (`Retry-After`) is a floor. Pure: the random source is given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """How long to wait before each reconnect, and when to stop.

    Attributes:
        base_s: the cap of the first delay.
        max_s: the cap of every delay.
        max_attempts: failed attempts in a row before the client gives up
            (`GaveUp`); None retries for ever. A connection that opens resets it.
        rng: the random source (seed it to replay a run).
    """

    base_s: float = 0.25
    max_s: float = 10.0
    max_attempts: int | None = 20
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError("Backoff needs 0 < base_s <= max_s")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("Backoff.max_attempts must be at least 1 (or None)")

    def cap(self, retry: int) -> float:
        """The upper bound of the delay before retry number `retry` (0 first)."""
        return min(self.max_s, self.base_s * 2.0 ** min(retry, 62))

    def delay(self, retry: int, suggested_s: float | None = None) -> float:
        """The delay before retry number `retry`: full jitter under `cap(retry)`,
        never less than the server's `suggested_s` (itself capped by `max_s`)."""
        jitter = float(self.rng.uniform(0.0, self.cap(retry)))
        if suggested_s is not None and suggested_s > 0:
            return max(jitter, min(suggested_s, self.max_s))
        return jitter

    def exhausted(self, attempts: int) -> bool:
        """True when `attempts` failed attempts in a row are all that is allowed."""
        return self.max_attempts is not None and attempts >= self.max_attempts
