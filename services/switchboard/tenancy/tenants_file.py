"""The tenants file: reading it and checking every key of it.

docs/tenants.md is the reference and deploy/examples/tenants.yaml a complete
example. `yaml_checks.decode` turns the file's bytes into plain data;
`parse_document` checks that data and builds the values of
`switchboard.tenancy.tenants` (the `upstreams:` section through
`upstreams_section.parse_upstreams`). Both raise one `ConfigError` whose message is
`<key path>: <problem>`, e.g.
`tenants.acme.limits.requests_per_minute: must be a positive integer`.

Unknown keys are errors, so a typo never silently drops a limit. No message
quotes a key hash, an instruction, a URL or the value of an environment
variable: only names, which are safe in logs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from switchboard.config import ConfigError
from switchboard.key_paths import KeyPath
from switchboard.tenancy.keys import TENANT_ID, normalize_key_hash
from switchboard.tenancy.mcp_section import parse_mcp_servers
from switchboard.tenancy.moderation_section import parse_moderation
from switchboard.tenancy.prices_section import Price, parse_money_budget, parse_prices
from switchboard.tenancy.summary_section import parse_summaries
from switchboard.tenancy.tenants import (
    DEFAULT_TIER,
    DEFAULT_UPSTREAM,
    LIMIT_NAMES,
    Deployment,
    Limits,
    ModelRoute,
    SessionDefaults,
    Tenant,
    Upstream,
)
from switchboard.tenancy.upstreams_section import parse_upstreams
from switchboard.tenancy.yaml_checks import (
    count,
    error,
    mapping,
    non_negative,
    sequence,
    string,
)

DEFAULT_TIERS = ("free", DEFAULT_TIER, "enterprise")
# Tiers are metric labels: a handful, short and plain.
MAX_TIERS = 16
TIER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
UPSTREAM_MODEL = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")
MAX_INSTRUCTIONS_CHARS = 64 * 1024

_TOP_KEYS = ("upstreams", "tenants", "tiers", "allow_private_hosts", "prices")
_TENANT_KEYS = (
    "keys",
    "tier",
    "models",
    "builtins",
    "webhooks",
    "limits",
    "daily_token_budget",
    "session",
    "money_budget",
    "mcp_servers",
    "moderation",
    "summaries",
)
_MODEL_KEYS = ("upstream", "upstream_model", "deployments")
_DEPLOYMENT_KEYS = ("upstream", "upstream_model", "weight", "priority")
_SESSION_KEYS = ("model", "instructions", "max_output_tokens")


@dataclass(frozen=True, slots=True)
class Document:
    """A checked tenants file.

    Attributes:
        upstreams: upstream deployments by name.
        tenants: tenants by id.
        tiers: the tier labels tenants may use.
        allow_private_hosts: webhook hosts exempt from toolexec's private-address rule.
        raw: the parsed YAML as written (a deep copy), for toolexec's own checks.
        prices: upstream models' prices (the `prices:` section, prices_section.py).
    """

    upstreams: Mapping[str, Upstream]
    tenants: Mapping[str, Tenant]
    tiers: tuple[str, ...]
    allow_private_hosts: tuple[str, ...]
    raw: Mapping[str, Any]
    prices: Mapping[str, Price] = field(default_factory=lambda: MappingProxyType({}))


def parse_document(data: Any, environ: Mapping[str, str], *, require_env: bool = True) -> Document:
    """Check parsed YAML and build the tenants and upstreams it describes.

    Args:
        data: the parsed document.
        environ: where `api_key_env` variables are read.
        require_env: when False, an unset `api_key_env` variable is not an
            error and the key is left empty (for `check --no-env` in CI).

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if data is None:
        raise ConfigError("the file is empty; it must hold a mapping with upstreams and tenants")
    top = mapping(data, (), _TOP_KEYS)
    tiers = _tiers(top.get("tiers"))
    upstreams = parse_upstreams(top.get("upstreams"), environ, require_env)
    hosts = tuple(
        string(host, ("allow_private_hosts", index))
        for index, host in enumerate(
            sequence(_listed(top.get("allow_private_hosts")), ("allow_private_hosts",))
        )
    )
    if top.get("tenants") is None:
        raise error(("tenants",), "is required (at least one tenant)")
    raw_tenants = mapping(top["tenants"], ("tenants",))
    if not raw_tenants:
        raise error(("tenants",), "must define at least one tenant")
    owners: dict[str, str] = {}
    tenants: dict[str, Tenant] = {}
    for tenant_id, body in raw_tenants.items():
        if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
            raise error(
                ("tenants", str(tenant_id)[:64]),
                f"tenant ids must be strings matching {TENANT_ID.pattern} "
                "(quote ids YAML reads as numbers or booleans)",
            )
        tenants[tenant_id] = _tenant(tenant_id, body, upstreams, tiers, owners)
    return Document(
        upstreams=MappingProxyType(upstreams),
        tenants=MappingProxyType(tenants),
        tiers=tiers,
        allow_private_hosts=hosts,
        raw=MappingProxyType(copy.deepcopy(top)),
        prices=MappingProxyType(parse_prices(top.get("prices"))),
    )


def _tiers(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_TIERS
    items = sequence(raw, ("tiers",))
    if not 1 <= len(items) <= MAX_TIERS:
        raise error(("tiers",), f"must list between 1 and {MAX_TIERS} tiers")
    tiers: list[str] = []
    for index, item in enumerate(items):
        tier = string(item, ("tiers", index))
        if not TIER.fullmatch(tier):
            raise error(("tiers", index), f"must match {TIER.pattern} (a metric label)")
        if tier in tiers:
            raise error(("tiers", index), f"{tier!r} is listed twice")
        tiers.append(tier)
    return tuple(tiers)


def _tenant(
    tenant_id: str,
    raw: Any,
    upstreams: Mapping[str, Upstream],
    tiers: tuple[str, ...],
    owners: dict[str, str],
) -> Tenant:
    path: KeyPath = ("tenants", tenant_id)
    body = mapping(raw, path, _TENANT_KEYS)
    tier = string(body.get("tier", DEFAULT_TIER), (*path, "tier"))
    if tier not in tiers:
        listed = ", ".join(tiers)
        if "tier" in body:
            raise error((*path, "tier"), f"must be one of the tiers: {listed}")
        raise error(
            (*path, "tier"),
            f"is required: the default {DEFAULT_TIER!r} is not one of the tiers ({listed})",
        )
    models = _models(body.get("models"), (*path, "models"), upstreams)
    limits = _limits(body.get("limits"), (*path, "limits"))
    return Tenant(
        id=tenant_id,
        tier=tier,
        key_hashes=_keys(body.get("keys"), (*path, "keys"), tenant_id, owners),
        models=MappingProxyType(models),
        builtins=_builtins(_listed(body.get("builtins")), (*path, "builtins")),
        webhooks=_webhooks(_listed(body.get("webhooks")), (*path, "webhooks")),
        limits=limits,
        daily_token_budget=count(body.get("daily_token_budget"), (*path, "daily_token_budget")),
        session=_session(body.get("session"), (*path, "session"), models, limits),
        money_budget=parse_money_budget(body.get("money_budget"), (*path, "money_budget")),
        mcp_servers=parse_mcp_servers(body.get("mcp_servers"), (*path, "mcp_servers")),
        moderation=parse_moderation(body.get("moderation"), (*path, "moderation"), upstreams),
        summaries=parse_summaries(body.get("summaries"), (*path, "summaries"), models),
    )


def _keys(raw: Any, path: KeyPath, tenant_id: str, owners: dict[str, str]) -> frozenset[str]:
    if raw is None:
        raise error(path, "is required (at least one key hash)")
    items = sequence(raw, path)
    if not items:
        raise error(path, "must list at least one key hash")
    hashes: set[str] = set()
    for index, item in enumerate(items):
        where = (*path, index)
        # Never quote the entry: it may be a key pasted where its hash belongs.
        digest = normalize_key_hash(item) if isinstance(item, str) else None
        if digest is None:
            raise error(
                where,
                "must be the SHA-256 of a key (64 hex digits, quoted), not the key itself; "
                "`python -m switchboard.tenancy new-key TENANT` prints both",
            )
        if digest in hashes:
            raise error(where, "repeats an earlier key hash of this tenant")
        owner = owners.get(digest)
        if owner is not None:
            raise error(
                where,
                f"this key hash is also a key of tenant {owner!r}; "
                f"a key must belong to one tenant (here {tenant_id!r} and {owner!r})",
            )
        owners[digest] = tenant_id
        hashes.add(digest)
    return frozenset(hashes)


def _models(raw: Any, path: KeyPath, upstreams: Mapping[str, Upstream]) -> dict[str, ModelRoute]:
    if raw is None:
        raise error(path, "is required (at least one model)")
    entries = mapping(raw, path)
    if not entries:
        raise error(path, "must list at least one model")
    models: dict[str, ModelRoute] = {}
    for name, body in entries.items():
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise error(
                (*path, str(name)[:64]),
                "model names must be strings of 1-128 characters without spaces",
            )
        where = (*path, name)
        fields = mapping({} if body is None else body, where, _MODEL_KEYS)
        target = _upstream_model(fields.get("upstream_model", name), (*where, "upstream_model"))
        if "deployments" in fields:
            if "upstream" in fields:
                raise error(
                    (*where, "upstream"), "name the upstream in each of `deployments` instead"
                )
            deployments = _deployments(
                fields["deployments"], (*where, "deployments"), target, upstreams
            )
            # The preferred deployment: the first listed of the lowest priority.
            first = min(deployments, key=lambda deployment: deployment.priority)
            models[name] = ModelRoute(name, first.upstream, first.upstream_model, deployments)
            continue
        upstream = _upstream_name(fields, where, upstreams)
        models[name] = ModelRoute(name=name, upstream=upstream, upstream_model=target)
    return models


def _upstream_name(
    fields: Mapping[str, Any], where: KeyPath, upstreams: Mapping[str, Upstream]
) -> str:
    """The `upstream` of a model or deployment: defined, `default` when absent."""
    upstream = string(fields.get("upstream", DEFAULT_UPSTREAM), (*where, "upstream"))
    if upstream not in upstreams:
        known = ", ".join(sorted(upstreams))
        if "upstream" not in fields:
            raise error(
                (*where, "upstream"),
                f"is required: there is no upstream named {DEFAULT_UPSTREAM!r} (defined: {known})",
            )
        raise error((*where, "upstream"), f"no upstream named {upstream[:64]!r} (defined: {known})")
    return upstream


def _upstream_model(raw: Any, path: KeyPath) -> str:
    target = string(raw, path)
    if not UPSTREAM_MODEL.fullmatch(target):
        raise error(path, "must be 1-256 characters without spaces")
    return target


def _deployments(
    raw: Any, path: KeyPath, default_model: str, upstreams: Mapping[str, Upstream]
) -> tuple[Deployment, ...]:
    items = sequence(raw, path)
    if not items:
        raise error(path, "must list at least one deployment")
    deployments: list[Deployment] = []
    for index, item in enumerate(items):
        where = (*path, index)
        fields = mapping(item, where, _DEPLOYMENT_KEYS)
        if "upstream" not in fields:
            raise error((*where, "upstream"), "is required")
        upstream = _upstream_name(fields, where, upstreams)
        if any(deployment.upstream == upstream for deployment in deployments):
            # One breaker and one queue per upstream: listing it twice would only skew weights.
            raise error((*where, "upstream"), f"{upstream!r} is listed twice")
        model = fields.get("upstream_model", default_model)
        deployments.append(
            Deployment(
                upstream=upstream,
                upstream_model=_upstream_model(model, (*where, "upstream_model")),
                weight=count(fields.get("weight", 1), (*where, "weight")) or 1,
                priority=non_negative(fields.get("priority", 0), (*where, "priority")) or 0,
            )
        )
        if upstreams[upstream].kind != upstreams[deployments[0].upstream].kind:
            # A voice session cannot fail over to Chat Completions, nor a text call to a socket.
            raise error((*where, "upstream"), "mixes chat and realtime upstreams in one model")
    return tuple(deployments)


def _builtins(raw: Any, path: KeyPath) -> tuple[str, ...]:
    names: list[str] = []
    for index, item in enumerate(sequence(raw, path)):
        name = string(item, (*path, index))
        if name in names:
            raise error((*path, index), f"{name[:64]!r} is listed twice")
        names.append(name)
    return tuple(names)


def _webhooks(raw: Any, path: KeyPath) -> tuple[Mapping[str, Any], ...]:
    hooks: list[Mapping[str, Any]] = []
    for index, item in enumerate(sequence(raw, path)):
        # toolexec checks the fields; here only the shape, so its paths stay valid.
        hooks.append(MappingProxyType(copy.deepcopy(mapping(item, (*path, index)))))
    return tuple(hooks)


def _limits(raw: Any, path: KeyPath) -> Limits:
    if raw is None:
        return Limits()
    fields = mapping(raw, path, LIMIT_NAMES)
    return Limits(**{name: count(fields.get(name), (*path, name)) for name in LIMIT_NAMES})


def _session(
    raw: Any, path: KeyPath, models: Mapping[str, ModelRoute], limits: Limits
) -> SessionDefaults:
    if raw is None:
        return SessionDefaults()
    fields = mapping(raw, path, _SESSION_KEYS)
    model = fields.get("model")
    if model is not None and (not isinstance(model, str) or model not in models):
        raise error((*path, "model"), "must be one of this tenant's models")
    instructions = fields.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise error((*path, "instructions"), "must be a string")
        if len(instructions) > MAX_INSTRUCTIONS_CHARS:
            raise error(
                (*path, "instructions"), f"must be at most {MAX_INSTRUCTIONS_CHARS} characters"
            )
    max_output = count(fields.get("max_output_tokens"), (*path, "max_output_tokens"))
    ceiling = limits.max_output_tokens
    if max_output is not None and ceiling is not None and max_output > ceiling:
        raise error(
            (*path, "max_output_tokens"),
            f"must be at most limits.max_output_tokens ({ceiling})",
        )
    return SessionDefaults(model=model, instructions=instructions, max_output_tokens=max_output)


def _listed(raw: Any) -> Any:
    """An empty list for a key left empty (`webhooks:`), `raw` otherwise."""
    return [] if raw is None else raw
