"""Webhook signatures: what toolexec sends and what `verify_signature` accepts."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from switchboard.toolexec.signing import sign, signature_header, verify_signature

SECRET = "whsec-0123456789abcdef"
BODY = b'{"order_id":"ord_1"}'
NOW = 1_700_000_000


def test_the_header_is_stripe_style_hmac_sha256_of_timestamp_dot_body() -> None:
    # Computed here independently of the module, as a receiver in any language would.
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature_header(SECRET, BODY, now=NOW) == f"t=1700000000,v1={expected}"
    assert sign(SECRET.encode(), BODY, timestamp=NOW) == expected


def test_a_fresh_signature_verifies() -> None:
    header = signature_header(SECRET, BODY, now=NOW)
    assert verify_signature(SECRET, header, BODY, now=NOW)
    assert verify_signature(SECRET.encode(), header, BODY, now=NOW + 299)
    assert verify_signature(SECRET, header, BODY, now=NOW - 299)


@pytest.mark.parametrize(
    ("secret", "body", "now"),
    [
        ("another-secret-0123456789", BODY, NOW),  # forged
        (SECRET, BODY + b" ", NOW),  # body changed
        (SECRET, b"", NOW),
        (SECRET, BODY, NOW + 301),  # replayed too late
        (SECRET, BODY, NOW - 301),  # from the future
    ],
)
def test_anything_else_does_not_verify(secret: str, body: bytes, now: int) -> None:
    header = signature_header(SECRET, BODY, now=NOW)
    assert not verify_signature(secret, header, body, now=now)


def test_the_tolerance_is_configurable() -> None:
    header = signature_header(SECRET, BODY, now=NOW)
    assert not verify_signature(SECRET, header, BODY, now=NOW + 60, tolerance_s=30)
    assert verify_signature(SECRET, header, BODY, now=NOW + 600, tolerance_s=900)


def test_any_of_several_v1_entries_may_match_for_secret_rotation() -> None:
    good = sign(SECRET, BODY, timestamp=NOW)
    stale = sign("old-secret-0123456789", BODY, timestamp=NOW)
    assert verify_signature(SECRET, f"t={NOW},v1={stale},v1={good}", BODY, now=NOW)
    assert verify_signature(SECRET, f"t={NOW}, v0=whatever, v1={good}", BODY, now=NOW)
    assert not verify_signature(SECRET, f"t={NOW},v1={stale}", BODY, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"t={NOW}",
        "v1=" + "0" * 64,
        f"t=abc,v1={'0' * 64}",
        f"t={NOW},t={NOW},v1={'0' * 64}",
        f"t=-{NOW},v1={'0' * 64}",
        f"t={NOW},v1=ünïcode",
        f"t={NOW},v1={'0' * 2000}",
    ],
)
def test_malformed_headers_do_not_verify(header: str | None) -> None:
    assert not verify_signature(SECRET, header, BODY, now=NOW)
