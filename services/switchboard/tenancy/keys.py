"""Tenant API keys: made here, stored nowhere.

Configuration holds the SHA-256 of each key (64 lowercase hex digits); a
presented key is hashed and looked up. `python -m switchboard.tenancy new-key
TENANT` prints a fresh key once, with the hash to configure.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk-sb-"
# Tenant ids become part of Redis keys and log fields: keep them plain.
TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_HASH = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a key: what configuration stores for it."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random tenant API key (`sk-sb-` and 256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def normalize_key_hash(text: str) -> str | None:
    """`text` as a lowercase 64-hex-digit SHA-256, or None when it is not one."""
    digest = text.strip().lower()
    return digest if KEY_HASH.fullmatch(digest) else None
