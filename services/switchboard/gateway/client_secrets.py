"""Ephemeral client secrets (`ek_...`) for browsers, stored hashed in Redis.

A server holding a tenant key mints a short-lived secret with
`POST /v1/realtime/client_secrets` (the shape of OpenAI's endpoint, so the
official SDK's `client.realtime.client_secrets.create()` works) and hands it to a
browser, which connects with it instead of the tenant key. The secret carries
the session it opens, and the fields the browser may not change.

Only the SHA-256 of a secret is stored, under `sb:ek:{<sha256>}`, with the
secret's TTL: Redis never holds a usable secret, and an expired one is gone.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions

from switchboard.errors import ServiceUnavailable, invalid_value
from switchboard.gateway import sessions
from switchboard.redis_client import AnyRedis
from switchboard.v1 import session_pb2

PREFIX = "ek_"
MIN_TTL_S = 10
MAX_TTL_S = 2 * 3600
DEFAULT_TTL_S = 600


@dataclass(frozen=True, slots=True)
class Grant:
    """What a redeemed secret allows: one tenant, one session shape, locked fields."""

    tenant_id: str
    session: dict[str, Any]
    config: session_pb2.SessionConfig
    locked: frozenset[str]
    expires_at: int


def _key(secret: str) -> str:
    return "sb:ek:{" + hashlib.sha256(secret.encode()).hexdigest() + "}"


def parse_ttl(body: dict[str, Any]) -> int:
    """Seconds until expiry from `expires_after` (default 10 minutes, 10 s to 2 h)."""
    expires_after = body.get("expires_after")
    if expires_after is None:
        return DEFAULT_TTL_S
    if not isinstance(expires_after, dict):
        raise invalid_value(
            "expires_after", "Invalid type for 'expires_after': expected an object."
        )
    if expires_after.get("anchor", "created_at") != "created_at":
        raise invalid_value("expires_after.anchor", "'expires_after.anchor' must be 'created_at'.")
    seconds = expires_after.get("seconds", DEFAULT_TTL_S)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise invalid_value("expires_after.seconds", "'expires_after.seconds' must be an integer.")
    if not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise invalid_value(
            "expires_after.seconds",
            f"'expires_after.seconds' must be between {MIN_TTL_S} and {MAX_TTL_S}.",
        )
    return seconds


class ClientSecrets:
    """Mints and redeems ephemeral secrets. Redis failures raise `ServiceUnavailable`."""

    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis

    async def mint(
        self,
        tenant_id: str,
        session: dict[str, Any],
        config: session_pb2.SessionConfig,
        ttl_s: int,
    ) -> tuple[str, int]:
        """Store a new secret; returns it (shown once, never stored) and its expiry."""
        secret = PREFIX + secrets.token_urlsafe(32)
        expires_at = int(time.time()) + ttl_s
        record = {
            "tenant_id": tenant_id,
            "session": session,
            "config": config.SerializeToString().hex(),
            "locked": list(sessions.LOCKABLE_FIELDS),
            "expires_at": expires_at,
        }
        try:
            await self._redis.set(_key(secret), orjson.dumps(record), ex=ttl_s)
        except redis.exceptions.RedisError:
            raise ServiceUnavailable("The client secret store is unavailable.") from None
        return secret, expires_at

    async def redeem(self, secret: str) -> Grant | None:
        """The grant of a live secret; None when unknown or expired."""
        if not secret.startswith(PREFIX):
            return None
        try:
            raw = await self._redis.get(_key(secret))
        except redis.exceptions.RedisError:
            raise ServiceUnavailable("The client secret store is unavailable.") from None
        if raw is None:
            return None
        record = orjson.loads(raw)
        if record["expires_at"] <= time.time():
            return None
        config = session_pb2.SessionConfig.FromString(bytes.fromhex(record["config"]))
        return Grant(
            tenant_id=record["tenant_id"],
            session=record["session"],
            config=config,
            locked=frozenset(record["locked"]),
            expires_at=record["expires_at"],
        )
