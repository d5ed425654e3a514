"""The tools file: which tools each tenant may use, and the tenants' own webhooks.

`SWITCHBOARD_TOOLEXEC_TOOLS_FILE` names a YAML file (docs/toolexec.md has the
full reference):

    allow_private_hosts: ["tools.internal"]
    tenants:
      acme:
        builtins: [calculate, current_time]
        webhooks:
          - name: lookup_order
            description: Look up an order by id
            parameters: {type: object, properties: {order_id: {type: string}}}
            url: https://tools.acme.example/lookup_order
            secret_env: ACME_LOOKUP_ORDER_SECRET

`load_tools_file` reads and checks the whole file and raises one
`ConfigError` naming the file and the key path of the first problem
(`tenants.acme.webhooks[0].url: must be an http(s) URL`). Unknown keys are
errors too, so a typo never silently drops a setting. Webhook secrets are read
from the environment variables the file names and held in `Secret`, which
never prints itself; no message here ever quotes a secret or a URL.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from switchboard.config import ConfigError, Secret
from switchboard.key_paths import KeyPath
from switchboard.tenancy import TENANT_ID, McpServer
from switchboard.tenancy.yaml_checks import decode, env_name
from switchboard.tenancy.yaml_checks import error as _error
from switchboard.tenancy.yaml_checks import mapping as _mapping
from switchboard.tenancy.yaml_checks import sequence as _list
from switchboard.tenancy.yaml_checks import string as _string
from switchboard.toolexec.registry import TOOL_NAME
from switchboard.toolexec.validation import ArgumentsSchema, SchemaError

DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 16
MAX_CONCURRENCY = 1024
# An HMAC key shorter than this is guessable; `openssl rand -hex 32` makes a good one.
MIN_SECRET_CHARS = 16
MAX_DESCRIPTION_CHARS = 1024

_TOP_KEYS = ("allow_private_hosts", "tenants")
_TENANT_KEYS = ("builtins", "webhooks")
_WEBHOOK_KEYS = (
    "name",
    "description",
    "parameters",
    "url",
    "secret_env",
    "timeout_s",
    "max_response_bytes",
    "max_concurrency",
)
_EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    """One tenant's HTTP tool, as configured.

    Attributes:
        tenant_id: the only tenant that may list and call it.
        name: the tool name (OpenAI's rule; never a built-in's name).
        description: what it does, for the model.
        parameters: JSON Schema (Draft 2020-12) of the arguments, already checked.
        url: the http(s) URL the arguments are POSTed to.
        secret_env: the environment variable the secret came from (safe to log).
        secret: the HMAC key that signs each request.
        timeout_s: longest a call may take, waiting for a free slot included.
        max_response_bytes: a longer response body is refused, unread.
        max_concurrency: calls to this webhook at once, per toolexec process.
    """

    tenant_id: str
    name: str
    description: str
    parameters: dict[str, Any] = field(repr=False)
    url: str = field(repr=False)
    secret_env: str
    secret: Secret = field(repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY


def _no_mcp_servers() -> Mapping[str, McpServer]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TenantTools:
    """What one tenant may use: built-ins by name, its own webhooks, and the
    remote MCP servers it registered in the tenants file (by label)."""

    builtins: frozenset[str] = frozenset()
    webhooks: tuple[WebhookSpec, ...] = ()
    mcp_servers: Mapping[str, McpServer] = field(default_factory=_no_mcp_servers)


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    """The whole tools file.

    Attributes:
        tenants: per-tenant access; None when there is no file, which means
            every tenant may use every built-in and nobody has webhooks.
        allow_private_hosts: hosts exempt from the private-address rule.
    """

    tenants: Mapping[str, TenantTools] | None = None
    allow_private_hosts: frozenset[str] = frozenset()


def load_tools_file(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str],
    builtin_names: Collection[str],
) -> ToolsConfig:
    """Read, parse and check a tools file.

    Args:
        path: the YAML file.
        environ: where `secret_env` variables are read.
        builtin_names: the built-in tools that exist; `builtins` may name only
            these, and no webhook may take one of these names.

    Raises:
        ConfigError: one line, `<file>: <key path>: <problem>`.
    """
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{path}: cannot read the tools file ({reason})") from None
    try:
        data = decode(content)
        return parse_tools_config(data, environ=environ, builtin_names=builtin_names)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_tools_config(
    data: Any, *, environ: Mapping[str, str], builtin_names: Collection[str]
) -> ToolsConfig:
    """Check parsed YAML (`None` for an empty file) and build the `ToolsConfig`.

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    top = _mapping({} if data is None else data, (), _TOP_KEYS)
    hosts = _list(top.get("allow_private_hosts", []), ("allow_private_hosts",))
    allow: set[str] = set()
    for index, host in enumerate(hosts):
        allow.add(_host(host, ("allow_private_hosts", index)))
    tenants: dict[str, TenantTools] = {}
    raw_tenants = top.get("tenants")
    for tenant_id, raw in _mapping(
        {} if raw_tenants is None else raw_tenants, ("tenants",)
    ).items():
        if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
            raise _error(
                ("tenants",),
                f"tenant id {str(tenant_id)[:64]!r} must be a string "
                f"matching {TENANT_ID.pattern} (quote ids YAML reads as other types)",
            )
        tenants[tenant_id] = _tenant(tenant_id, raw, environ, builtin_names)
    return ToolsConfig(tenants=tenants, allow_private_hosts=frozenset(allow))


def _tenant(
    tenant_id: str, raw: Any, environ: Mapping[str, str], builtin_names: Collection[str]
) -> TenantTools:
    path: KeyPath = ("tenants", tenant_id)
    body = _mapping({} if raw is None else raw, path, _TENANT_KEYS)
    builtins: set[str] = set()
    for index, name in enumerate(_list(body.get("builtins", []), (*path, "builtins"))):
        where = (*path, "builtins", index)
        if _string(name, where) not in builtin_names:
            known = ", ".join(sorted(builtin_names)) or "none"
            raise _error(where, f"unknown built-in tool {name[:64]!r} (known: {known})")
        builtins.add(name)
    webhooks: list[WebhookSpec] = []
    for index, item in enumerate(_list(body.get("webhooks", []), (*path, "webhooks"))):
        spec = _webhook(tenant_id, item, (*path, "webhooks", index), environ)
        if spec.name in builtin_names:
            raise _error(
                (*path, "webhooks", index, "name"), f"{spec.name!r} is the name of a built-in tool"
            )
        if any(other.name == spec.name for other in webhooks):
            raise _error(
                (*path, "webhooks", index, "name"),
                f"{spec.name!r} is already the name of another webhook of this tenant",
            )
        webhooks.append(spec)
    return TenantTools(builtins=frozenset(builtins), webhooks=tuple(webhooks))


def _webhook(tenant_id: str, raw: Any, path: KeyPath, environ: Mapping[str, str]) -> WebhookSpec:
    body = _mapping(raw, path, _WEBHOOK_KEYS)
    for required in ("name", "description", "url", "secret_env"):
        if required not in body:
            raise _error((*path, required), "is required")
    name = _string(body["name"], (*path, "name"))
    if not TOOL_NAME.fullmatch(name):
        raise _error(
            (*path, "name"), "must be 1-64 letters, digits, underscores or dashes (OpenAI's rule)"
        )
    description = _string(body["description"], (*path, "description"))
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise _error((*path, "description"), f"must be at most {MAX_DESCRIPTION_CHARS} characters")
    parameters = _parameters(body.get("parameters", _EMPTY_OBJECT_SCHEMA), (*path, "parameters"))
    url = _url(body["url"], (*path, "url"))
    secret_env = env_name(body["secret_env"], (*path, "secret_env"))
    return WebhookSpec(
        tenant_id=tenant_id,
        name=name,
        description=description,
        parameters=parameters,
        url=url,
        secret_env=secret_env,
        secret=_secret(secret_env, environ, (*path, "secret_env")),
        timeout_s=_number(body.get("timeout_s", DEFAULT_TIMEOUT_S), (*path, "timeout_s")),
        max_response_bytes=_integer(
            body.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
            (*path, "max_response_bytes"),
            MAX_RESPONSE_BYTES,
        ),
        max_concurrency=_integer(
            body.get("max_concurrency", DEFAULT_MAX_CONCURRENCY),
            (*path, "max_concurrency"),
            MAX_CONCURRENCY,
        ),
    )


def _parameters(raw: Any, path: KeyPath) -> dict[str, Any]:
    schema = _mapping(raw, path)
    try:
        ArgumentsSchema(schema)
    except SchemaError as exc:
        raise _error((*path, *exc.path), exc.problem) from None
    return dict(schema)


def _url(raw: Any, path: KeyPath) -> str:
    url = _string(raw, path)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise _error(path, "must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise _error(path, "must be an http(s) URL")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and proxies; the signature authenticates.
        raise _error(
            path,
            "must not hold credentials (user:password@); the signature "
            "authenticates toolexec to the webhook",
        )
    if parts.fragment:
        raise _error(path, "must not have a #fragment")
    return url


def _host(raw: Any, path: KeyPath) -> str:
    host = _string(raw, path).strip().removeprefix("[").removesuffix("]")
    # "::1" is an address; "tools:8080" or "http://tools" would never match a host.
    if "/" in host or "@" in host or (":" in host and not _is_ipv6(host)):
        raise _error(path, "must be a host name or IP address, without scheme or port")
    return host


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _secret(name: str, environ: Mapping[str, str], path: KeyPath) -> Secret:
    value = environ.get(name)
    if not value:
        raise _error(path, f"environment variable {name} is not set")
    if len(value) < MIN_SECRET_CHARS:
        raise _error(
            path,
            f"environment variable {name} holds fewer than {MIN_SECRET_CHARS} "
            "characters; use a random secret such as `openssl rand -hex 32`",
        )
    return Secret(value)


def _number(raw: Any, path: KeyPath) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _error(path, "must be a number of seconds")
    if not 0 < raw <= MAX_TIMEOUT_S:
        raise _error(path, f"must be > 0 and at most {MAX_TIMEOUT_S:g}")
    return float(raw)


def _integer(raw: Any, path: KeyPath, maximum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _error(path, "must be an integer")
    if not 1 <= raw <= maximum:
        raise _error(path, f"must be between 1 and {maximum}")
    return raw
