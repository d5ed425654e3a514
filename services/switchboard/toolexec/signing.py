"""Webhook request signatures: how toolexec signs a call and how a receiver checks it.

Every webhook request carries

    X-Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>

the scheme Stripe uses: the timestamp is signed with the exact body bytes, so
a receiver that checks the HMAC and that `t` is recent (five minutes either
way by default) knows the request came from a holder of the secret, was not
changed, and is not an old request replayed. A receiver should accept any of
several `v1=` entries, so a secret can be rotated by sending two signatures;
toolexec sends one. Receivers import `verify_signature` from here (it has no
dependency beyond the standard library) or port its twelve lines.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Switchboard-Signature"
DEFAULT_TOLERANCE_S = 300
# A longer header is not ours; refuse it before doing any work.
_MAX_HEADER_CHARS = 1024


def sign(secret: str | bytes, body: bytes, *, timestamp: int) -> str:
    """The hex HMAC-SHA256 of `b"<timestamp>." + body` under `secret` (UTF-8 if text)."""
    key = secret.encode() if isinstance(secret, str) else secret
    message = f"{timestamp}.".encode() + body
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, *, now: float | None = None) -> str:
    """The `X-Switchboard-Signature` value for `body`, signed at `now` (default: the time)."""
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},v1={sign(secret, body, timestamp=timestamp)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """Check a request's `X-Switchboard-Signature` header against its raw body.

    Args:
        secret: the webhook's secret, the value toolexec reads from `secret_env`.
        header: the header's value as received (None when it is missing).
        body: the request body exactly as received, before any JSON parsing.
        now: the current Unix time; the clock by default.
        tolerance_s: how far `t` may be from `now`, either way.

    Returns:
        True when `t` is within the tolerance and one `v1` entry is the HMAC of
        the body at `t`; False for anything else (missing, malformed, stale or
        forged). Digests are compared in constant time.
    """
    if not header or len(header) > _MAX_HEADER_CHARS:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
        # Other schemes (v0, a future v2) are ignored, as Stripe's receivers do.
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp=timestamp).encode()
    # Check every candidate so the time taken does not tell which one matched;
    # compare bytes, as compare_digest refuses non-ASCII text.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.strip().lower().encode())
    return matched
