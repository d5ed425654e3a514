"""Per-tenant limits in Redis that hold exactly across replicas (docs/limits.md)."""

from switchboard.limits.decision import (
    INSUFFICIENT_QUOTA,
    RATE_LIMIT_EXCEEDED,
    UNLIMITED,
    Decision,
    LimitsStoreUnavailable,
    QuotaExceeded,
    RateLimit,
    RateLimitExceeded,
    RateLimitState,
)
from switchboard.limits.limiter import TenantLimiter

__all__ = [
    "INSUFFICIENT_QUOTA",
    "RATE_LIMIT_EXCEEDED",
    "UNLIMITED",
    "Decision",
    "LimitsStoreUnavailable",
    "QuotaExceeded",
    "RateLimit",
    "RateLimitExceeded",
    "RateLimitState",
    "TenantLimiter",
]
