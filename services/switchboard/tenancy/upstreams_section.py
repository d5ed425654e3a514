"""The `upstreams:` section of the tenants file: the model deployments calls go to.

Each upstream is a name, an OpenAI-compatible base URL, the environment variable
holding its key (never the key itself), and optional admission and circuit
breaker settings for the broker (docs/tenants.md, docs/broker.md). Errors are
one `ConfigError("<key path>: <problem>")`; no message quotes a URL or a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from switchboard.config import Secret
from switchboard.key_paths import KeyPath
from switchboard.tenancy.tenants import (
    UPSTREAM_KINDS,
    Upstream,
    UpstreamAdmission,
    UpstreamBreaker,
    UpstreamRollover,
)
from switchboard.tenancy.yaml_checks import (
    count,
    env_name,
    error,
    http_url,
    mapping,
    non_negative,
    seconds,
)

# Five minutes before OpenAI's 60-minute limit: time to find a pause between turns.
DEFAULT_ROLLOVER_MARGIN_S = 300.0
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_UPSTREAM_KEYS = ("base_url", "api_key_env", "admission", "circuit_breaker", "kind", "rollover")
_ADMISSION_KEYS = ("max_concurrent", "max_queued", "max_queued_per_tenant", "queue_timeout_s")
_BREAKER_KEYS = ("failures", "cooldown_s")
_ROLLOVER_KEYS = ("session_limit_s", "margin_s")


def parse_upstreams(raw: Any, environ: Mapping[str, str], require_env: bool) -> dict[str, Upstream]:
    """The `upstreams:` mapping: each deployment by name, its key read from the environment.

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        raise error(("upstreams",), "is required (at least one upstream deployment)")
    upstreams: dict[str, Upstream] = {}
    for name, body in mapping(raw, ("upstreams",)).items():
        if not isinstance(name, str) or not UPSTREAM_NAME.fullmatch(name):
            raise error(
                ("upstreams", str(name)[:64]),
                f"upstream names must be strings matching {UPSTREAM_NAME.pattern}",
            )
        path: KeyPath = ("upstreams", name)
        fields = mapping(body, path, _UPSTREAM_KEYS)
        if "base_url" not in fields:
            raise error((*path, "base_url"), "is required")
        key_env = fields.get("api_key_env")
        secret = Secret("")
        if key_env is not None:
            key_env = env_name(key_env, (*path, "api_key_env"))
            value = environ.get(key_env)
            if value:
                secret = Secret(value)
            elif require_env:
                raise error((*path, "api_key_env"), f"environment variable {key_env} is not set")
        kind = _kind(fields.get("kind", "chat"), (*path, "kind"))
        upstreams[name] = Upstream(
            name=name,
            base_url=_base_url(fields["base_url"], (*path, "base_url")),
            api_key=secret,
            api_key_env=key_env,
            admission=_admission(fields.get("admission"), (*path, "admission")),
            circuit_breaker=_breaker(fields.get("circuit_breaker"), (*path, "circuit_breaker")),
            kind=kind,
            rollover=_rollover(fields.get("rollover"), kind, (*path, "rollover")),
        )
    if not upstreams:
        raise error(("upstreams",), "must define at least one upstream")
    return upstreams


def _admission(raw: Any, path: KeyPath) -> UpstreamAdmission:
    if raw is None:
        return UpstreamAdmission()
    fields = mapping(raw, path, _ADMISSION_KEYS)
    return UpstreamAdmission(
        max_concurrent=count(fields.get("max_concurrent"), (*path, "max_concurrent")),
        # 0 is a real choice: refuse at once when every slot is taken.
        max_queued=non_negative(fields.get("max_queued"), (*path, "max_queued")),
        max_queued_per_tenant=non_negative(
            fields.get("max_queued_per_tenant"), (*path, "max_queued_per_tenant")
        ),
        queue_timeout_s=seconds(fields.get("queue_timeout_s"), (*path, "queue_timeout_s")),
    )


def _breaker(raw: Any, path: KeyPath) -> UpstreamBreaker:
    if raw is None:
        return UpstreamBreaker()
    fields = mapping(raw, path, _BREAKER_KEYS)
    return UpstreamBreaker(
        failures=count(fields.get("failures"), (*path, "failures")),
        cooldown_s=seconds(fields.get("cooldown_s"), (*path, "cooldown_s")),
    )


def _rollover(raw: Any, kind: str, path: KeyPath) -> UpstreamRollover:
    if raw is None:
        return UpstreamRollover()
    if kind != "realtime":
        raise error(path, "applies to upstreams of kind: realtime only")
    fields = mapping(raw, path, _ROLLOVER_KEYS)
    if "session_limit_s" not in fields:
        raise error((*path, "session_limit_s"), "is required")
    limit = seconds(fields["session_limit_s"], (*path, "session_limit_s")) or 0.0
    margin = seconds(fields.get("margin_s"), (*path, "margin_s"))
    if margin is None:
        # A short limit (a test's) keeps half of itself for the search.
        margin = min(DEFAULT_ROLLOVER_MARGIN_S, limit / 2)
    elif margin >= limit:
        raise error((*path, "margin_s"), "must be below session_limit_s")
    return UpstreamRollover(session_limit_s=limit, margin_s=margin)


def _kind(raw: Any, path: KeyPath) -> str:
    if raw not in UPSTREAM_KINDS:
        raise error(path, f"must be one of {', '.join(UPSTREAM_KINDS)}")
    return str(raw)


def _base_url(raw: Any, path: KeyPath) -> str:
    parts = http_url(raw, path)
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        # The URL is logged and shown by `check`; keys belong in api_key_env.
        raise error(
            path, "must not hold credentials, a query or a fragment (put the key in api_key_env)"
        )
    return str(raw)
