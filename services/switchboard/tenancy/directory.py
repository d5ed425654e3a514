"""`TenantDirectory`: one immutable snapshot of every tenant and upstream.

Built from the tenants file (`load`, `parse`), or, for development, from a
single key (`single`) or the older `SWITCHBOARD_TENANT_KEYS` variable
(`from_key_spec`). A directory never changes; `LiveTenants`
(switchboard.tenancy.live) swaps in a new one when the file changes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from switchboard.config import ConfigError, Env
from switchboard.tenancy.keys import TENANT_ID, hash_key, normalize_key_hash
from switchboard.tenancy.prices_section import Price
from switchboard.tenancy.tenants import DEFAULT_UPSTREAM, ModelRoute, Tenant, Upstream
from switchboard.tenancy.tenants_file import DEFAULT_TIERS, parse_document
from switchboard.tenancy.yaml_checks import decode

TENANT_KEYS_VARIABLE = "SWITCHBOARD_TENANT_KEYS"
# Development tenants' voice model, when SWITCHBOARD_BROKER_REALTIME_URL names a
# Realtime upstream (docs/voice.md).
DEV_VOICE_MODEL = "gpt-realtime-voice"
REALTIME_UPSTREAM = "realtime"


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TenantDirectory:
    """Every tenant and upstream of the deployment, as of one configuration.

    Attributes:
        tenants: tenants by id.
        upstreams: upstream deployments by name.
        allow_private_hosts: webhook hosts exempt from toolexec's private-address rule.
        tiers: the tier labels in use (a small, bounded set: safe metric labels).
        raw: the tenants file as parsed (empty for development directories),
            for toolexec's own checks of `builtins` and `webhooks`.
        source: where this came from (a path or a variable name), for logs.
        prices: upstream models' prices, by model name (none for development
            directories: costs are then 0).

    Raises:
        ConfigError: two tenants share a key hash (on construction).
    """

    tenants: Mapping[str, Tenant]
    upstreams: Mapping[str, Upstream]
    allow_private_hosts: tuple[str, ...] = ()
    tiers: tuple[str, ...] = DEFAULT_TIERS
    raw: Mapping[str, Any] = field(default_factory=_empty, repr=False)
    source: str = "<memory>"
    prices: Mapping[str, Price] = field(default_factory=_empty, repr=False)
    _by_hash: Mapping[str, Tenant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_hash: dict[str, Tenant] = {}
        for tenant in self.tenants.values():
            for digest in tenant.key_hashes:
                other = by_hash.get(digest)
                if other is not None:
                    raise ConfigError(
                        f"tenants {other.id!r} and {tenant.id!r} share a key hash; "
                        "a key must belong to one tenant"
                    )
                by_hash[digest] = tenant
        object.__setattr__(self, "_by_hash", MappingProxyType(by_hash))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        environ: Mapping[str, str] | None = None,
        *,
        require_env: bool = True,
    ) -> TenantDirectory:
        """Read and check a tenants file.

        Args:
            path: the YAML file (symlinks are followed).
            environ: where `api_key_env` variables are read; os.environ if None.
            require_env: False accepts unset `api_key_env` variables (empty keys).

        Raises:
            ConfigError: one line, `<path>: <key path>: <problem>`; never a secret.
        """
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"{path}: cannot read the tenants file ({reason})") from None
        return cls.from_bytes(content, str(path), environ, require_env=require_env)

    @classmethod
    def from_bytes(
        cls,
        content: bytes,
        source: str,
        environ: Mapping[str, str] | None = None,
        *,
        require_env: bool = True,
    ) -> TenantDirectory:
        """Check the bytes of a tenants file; errors are prefixed with `source`.

        Raises:
            ConfigError: one line, `<source>: <key path>: <problem>`.
        """
        try:
            return cls.parse(decode(content), environ, source=source, require_env=require_env)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def parse(
        cls,
        data: Any,
        environ: Mapping[str, str] | None = None,
        *,
        source: str = "<memory>",
        require_env: bool = True,
    ) -> TenantDirectory:
        """Check an already-parsed tenants document (a mapping, as YAML gives it).

        Raises:
            ConfigError: `<key path>: <problem>` for the first problem found.
        """
        document = parse_document(
            data, os.environ if environ is None else environ, require_env=require_env
        )
        return cls(
            tenants=document.tenants,
            upstreams=document.upstreams,
            allow_private_hosts=document.allow_private_hosts,
            tiers=document.tiers,
            raw=document.raw,
            prices=document.prices,
            source=source,
        )

    @classmethod
    def from_key_spec(cls, spec: str, environ: Mapping[str, str] | None = None) -> TenantDirectory:
        """Development tenants from `tenant=sha256hex,...` (the older variable).

        Each tenant may use every model (routed to the `default` upstream under
        the name the client sends) and every built-in tool, with no limits; a
        tenant listed twice has both keys. Without entries, the directory is empty.

        Raises:
            ConfigError: naming `SWITCHBOARD_TENANT_KEYS`, never quoting a hash or key.
        """
        keys: dict[str, list[str]] = {}
        for index, entry in enumerate(filter(None, (part.strip() for part in spec.split(",")))):
            tenant_id, sep, digest = entry.partition("=")
            tenant_id = tenant_id.strip()
            if not sep or not tenant_id:
                raise ConfigError(
                    f"{TENANT_KEYS_VARIABLE}: entry {index + 1} must be TENANT=SHA256HEX"
                )
            keys.setdefault(tenant_id, []).append(digest)
        upstream = environment_upstream(environ)
        voice = realtime_upstream(environ)
        try:
            return cls._development(keys, upstream, voice, source=TENANT_KEYS_VARIABLE)
        except ConfigError as exc:
            raise ConfigError(f"{TENANT_KEYS_VARIABLE}: {exc}") from None

    @classmethod
    def _development(
        cls,
        keys: Mapping[str, list[str]],
        upstream: Upstream,
        voice: tuple[Upstream, str] | None = None,
        *,
        source: str,
    ) -> TenantDirectory:
        tenants: dict[str, Tenant] = {}
        for tenant_id, digests in keys.items():
            if not TENANT_ID.fullmatch(tenant_id):
                raise ConfigError(f"tenant id {tenant_id[:64]!r} must match {TENANT_ID.pattern}")
            hashes = {normalize_key_hash(digest) for digest in digests}
            if None in hashes:
                raise ConfigError(
                    f"tenant {tenant_id!r}: a key hash is not 64 hex digits "
                    "(configure the SHA-256 of the key, not the key)"
                )
            models = {}
            if voice is not None:
                route = ModelRoute(DEV_VOICE_MODEL, voice[0].name, voice[1])
                models[DEV_VOICE_MODEL] = route
            tenants[tenant_id] = Tenant(
                id=tenant_id,
                key_hashes=frozenset(digest for digest in hashes if digest is not None),
                models=MappingProxyType(models),
                any_model_upstream=upstream.name,
                all_builtins=True,
            )
        upstreams = {upstream.name: upstream}
        if voice is not None:
            upstreams[voice[0].name] = voice[0]
        return cls(
            tenants=MappingProxyType(tenants),
            upstreams=MappingProxyType(upstreams),
            source=source,
        )

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning the API key `key`, or None.

        Looking the digest up in a dict leaks timing only about the digest, which
        tells an attacker nothing about any key.
        """
        return self._by_hash.get(hash_key(key)) if key else None

    def get(self, tenant_id: str) -> Tenant | None:
        """The tenant with this id, or None."""
        return self.tenants.get(tenant_id)

    def __len__(self) -> int:
        return len(self.tenants)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self.tenants.values())

    def tools_document(self) -> dict[str, Any] | None:
        """The tenants' tools in toolexec's tools-file shape (docs/toolexec.md).

        Returns:
            `{"allow_private_hosts": [...], "tenants": {id: {"builtins": [...],
            "webhooks": [...]}}}` as fresh plain data for
            `switchboard.toolexec.tools_config.parse_tools_config`; None for a
            development directory, meaning every built-in and no webhooks.
        """
        if any(tenant.all_builtins for tenant in self.tenants.values()):
            return None
        return {
            "allow_private_hosts": list(self.allow_private_hosts),
            "tenants": {
                tenant.id: {
                    "builtins": list(tenant.builtins),
                    "webhooks": [copy.deepcopy(dict(hook)) for hook in tenant.webhooks],
                }
                for tenant in self.tenants.values()
            },
        }


def environment_upstream(environ: Mapping[str, str] | None = None) -> Upstream:
    """The `default` upstream of development directories, from the broker's variables.

    The URL is `SWITCHBOARD_BROKER_UPSTREAM_URL`, else `OPENAI_BASE_URL`, else
    OpenAI's; the key `SWITCHBOARD_BROKER_UPSTREAM_API_KEY`, else
    `OPENAI_API_KEY`, else none (the simulator needs none).

    Raises:
        ConfigError: a URL variable holds no http(s) URL (named, not quoted).
    """
    env = Env(environ)
    default_url = env.string("OPENAI_BASE_URL", "https://api.openai.com/v1")
    url = env.url("SWITCHBOARD_BROKER_UPSTREAM_URL", default_url, schemes=("http", "https"))
    for variable in ("SWITCHBOARD_BROKER_UPSTREAM_API_KEY", "OPENAI_API_KEY"):
        secret = env.secret(variable)
        if secret is not None:
            return Upstream(DEFAULT_UPSTREAM, url, secret, variable)
    return Upstream(DEFAULT_UPSTREAM, url)


def realtime_upstream(environ: Mapping[str, str] | None = None) -> tuple[Upstream, str] | None:
    """The development Realtime upstream and its model, when one is configured.

    `SWITCHBOARD_BROKER_REALTIME_URL` (an http(s) base URL; the broker connects
    to `{url}/realtime`), the model `SWITCHBOARD_BROKER_REALTIME_MODEL`
    (default `gpt-realtime`), and the same key as the `default` upstream.
    Development tenants reach it as the model `gpt-realtime-voice`. None when
    the URL is not set.

    Raises:
        ConfigError: the URL variable holds no http(s) URL (named, not quoted).
    """
    env = Env(environ)
    if not env.string("SWITCHBOARD_BROKER_REALTIME_URL", ""):
        return None
    url = env.url("SWITCHBOARD_BROKER_REALTIME_URL", "", schemes=("http", "https"))
    model = env.string("SWITCHBOARD_BROKER_REALTIME_MODEL", "gpt-realtime")
    key = environment_upstream(environ)
    return (
        Upstream(REALTIME_UPSTREAM, url, key.api_key, key.api_key_env, kind="realtime"),
        model,
    )
