"""Redis keys and ids of the session store, validated before they reach Redis."""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

from switchboard.errors import InvalidRequest, invalid_value
from switchboard.v1 import common_pb2

ROOT_ITEM_ID = "root"
MAX_TENANT_ID_CHARS = 64
MAX_SESSION_ID_CHARS = 128
MAX_ITEM_ID_CHARS = 128

# Tenant and session ids become part of Redis keys: no braces (hash tags), no
# colons (separators), no spaces or control characters.
_KEY_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


class SessionKeys(NamedTuple):
    """The Redis keys of one session, all in the same hash slot."""

    meta: str
    items: str
    order: str
    events: str


def validate_key_id(value: str, param: str, max_chars: int) -> str:
    """Return `value` if it may become part of a Redis key, else raise.

    Raises:
        InvalidRequest: `missing_required_parameter` when empty, `invalid_value`
            when longer than `max_chars` or outside `[A-Za-z0-9_.-]`; `param` names it.
    """
    if not value:
        raise InvalidRequest(
            f"Missing required parameter: '{param}'.",
            code=common_pb2.ERROR_CODE_MISSING_REQUIRED_PARAMETER,
            param=param,
        )
    if len(value) > max_chars or not _KEY_SAFE_ID.fullmatch(value):
        raise invalid_value(
            param, f"'{param}' must be 1 to {max_chars} characters from [A-Za-z0-9_.-]."
        )
    return value


def session_keys(tenant_id: str, session_id: str) -> SessionKeys:
    """The keys of a session, after validating both ids (see `validate_key_id`)."""
    validate_key_id(tenant_id, "tenant_id", MAX_TENANT_ID_CHARS)
    validate_key_id(session_id, "session_id", MAX_SESSION_ID_CHARS)
    prefix = f"sb:{{{tenant_id}:{session_id}}}"
    return SessionKeys(f"{prefix}:meta", f"{prefix}:items", f"{prefix}:order", f"{prefix}:events")


class LeaseKeys(NamedTuple):
    """The writer lease of one session (same hash slot as its `SessionKeys`).

    They expire with the lease, not with the session, so they stay out of
    `SessionKeys` (whose keys every write script refreshes to the session TTL).
    """

    owner: str
    wanted: str


def lease_keys(tenant_id: str, session_id: str) -> LeaseKeys:
    """The lease keys of a session, after validating both ids."""
    return lease_keys_of(session_keys(tenant_id, session_id))


def lease_keys_of(keys: SessionKeys) -> LeaseKeys:
    """The lease keys of the session whose `keys` are given (ids already validated)."""
    prefix = keys.meta.removesuffix(":meta")
    return LeaseKeys(f"{prefix}:owner", f"{prefix}:wanted")


def new_session_id() -> str:
    """An unguessable session id: `sess_` and 144 random bits, URL-safe."""
    return "sess_" + secrets.token_urlsafe(18)


def new_item_id() -> str:
    """A random item id: `item_` and 96 random bits, URL-safe."""
    return "item_" + secrets.token_urlsafe(12)
