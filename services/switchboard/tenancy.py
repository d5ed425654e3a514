"""Tenants and their API keys.

Keys are never stored: configuration holds the SHA-256 of each key, and a
presented key is hashed and looked up. `python -m switchboard.tenancy new-key`
prints a fresh key and the line to configure for it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from switchboard.config import ConfigError

KEY_PREFIX = "sk-sb-"
# Tenant ids become part of Redis keys and log fields: keep them plain.
TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Maps key hashes to tenants. Built from `tenant=sha256hex,...`."""

    def __init__(self, hashes: dict[str, Tenant]) -> None:
        self._hashes = hashes

    @classmethod
    def parse(cls, spec: str, *, variable: str = "SWITCHBOARD_TENANT_KEYS") -> KeyRing:
        hashes: dict[str, Tenant] = {}
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            tenant_id, sep, digest = entry.partition("=")
            digest = digest.strip().lower()
            if not sep or not tenant_id.strip() or len(digest) != 64:
                raise ConfigError(
                    f"{variable}: entries must be TENANT=SHA256HEX, got {entry[:20]!r}"
                )
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise ConfigError(f"{variable}: {tenant_id.strip()!r} has a non-hex hash") from None
            tenant_id = tenant_id.strip()
            if not TENANT_ID.fullmatch(tenant_id):
                raise ConfigError(
                    f"{variable}: tenant id {tenant_id[:64]!r} must match {TENANT_ID.pattern}"
                )
            hashes[digest] = Tenant(tenant_id)
        return cls(hashes)

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning `key`, or None.

        Looking the digest up in a dict leaks timing only about the digest, which
        tells an attacker nothing about any key.
        """
        return self._hashes.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._hashes)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m switchboard.tenancy")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("new-key", help="create a tenant API key")
    create.add_argument("tenant", help="tenant id")
    args = parser.parse_args()
    if args.command == "new-key":
        key = new_key()
        print(f"key (give it to the tenant, it is not stored): {key}")
        print(f"SWITCHBOARD_TENANT_KEYS entry: {args.tenant}={hash_key(key)}")


if __name__ == "__main__":
    main()
