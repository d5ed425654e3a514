"""Which tools each tenant may see and run, and keeping that in step with the tools file.

A `Catalog` is an immutable snapshot built from the built-in `Registry` and a
`ToolsConfig`: for each tenant, its allowed built-ins plus its own webhooks.
`find` answers a call by name with the tool and the semaphore that bounds its
concurrency, or a refusal: NOT_ALLOWED for a built-in the tenant may not use,
UNKNOWN_TOOL for everything else, including another tenant's webhook, so a
tenant cannot even learn that another tenant's webhook exists.

`LiveCatalog` holds the catalog of a tools file and re-reads the file when
its modification time, size or inode changes (checked at most once per
`check_interval_s`, on use: no background task to start or stop). A file that
no longer loads is logged with the key path of the problem and the previous
catalog is kept. Semaphores of unchanged tools survive a reload, so running
calls keep counting against the same limit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from switchboard.config import ConfigError
from switchboard.tenancy import McpServer, TenantDirectory
from switchboard.toolexec.registry import Registry, Tool
from switchboard.toolexec.tools_config import (
    TenantTools,
    ToolsConfig,
    WebhookSpec,
    load_tools_file,
    parse_tools_config,
)
from switchboard.toolexec.webhooks import WebhookClient

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_S = 1.0


class Refusal(enum.Enum):
    """Why a tenant cannot call a tool by that name."""

    UNKNOWN_TOOL = "unknown_tool"
    NOT_ALLOWED = "not_allowed"


@dataclass(frozen=True, slots=True)
class Usable:
    """A tool the tenant may call, with the semaphore of its `max_concurrency`."""

    tool: Tool
    slots: asyncio.Semaphore


class CatalogSource(Protocol):
    """Anything that gives the catalog in force: a `Catalog` or a `LiveCatalog`."""

    def current(self) -> Catalog: ...


class Catalog:
    """One snapshot of what every tenant may use.

    Args:
        registry: the built-in tools, with their semaphores (shared by all tenants).
        config: per-tenant access; the default (no tools file) lets every
            tenant use every built-in, with no webhooks.
        webhooks: per tenant, its webhook tools by name (see `build`).
    """

    def __init__(
        self,
        registry: Registry,
        config: ToolsConfig | None = None,
        webhooks: Mapping[str, Mapping[str, Usable]] | None = None,
    ) -> None:
        self._registry = registry
        self.config = config if config is not None else ToolsConfig()
        self._webhooks = webhooks or {}

    @classmethod
    def build(
        cls,
        registry: Registry,
        config: ToolsConfig,
        client: WebhookClient | None,
        slots: WebhookSlots | None = None,
    ) -> Catalog:
        """The catalog of `config`, its webhooks calling through `client`.

        Also makes `client` apply the config's `allow_private_hosts`.

        Raises:
            ValueError: the config has webhooks but there is no client.
        """
        slots = slots if slots is not None else WebhookSlots()
        webhooks: dict[str, dict[str, Usable]] = {}
        for tenant_id, tenant in (config.tenants or {}).items():
            if tenant.webhooks and client is None:
                raise ValueError("a config with webhooks needs a WebhookClient")
            webhooks[tenant_id] = {
                spec.name: Usable(client.tool(spec), slots.semaphore(spec))
                for spec in tenant.webhooks
                if client is not None
            }
        if client is not None:
            client.guard.allow_private(config.allow_private_hosts)
        return cls(registry, config, webhooks)

    def current(self) -> Catalog:
        """Itself: a fixed catalog is its own `CatalogSource`."""
        return self

    def tools_for(self, tenant_id: str) -> tuple[Tool, ...]:
        """Every tool the tenant may call, sorted by name."""
        tools = [tool for tool in self._registry.list() if self._allows_builtin(tenant_id, tool)]
        tools.extend(usable.tool for usable in self._webhooks.get(tenant_id, {}).values())
        return tuple(sorted(tools, key=lambda tool: tool.name))

    def find(self, tenant_id: str, name: str) -> Usable | Refusal:
        """The tool `tenant_id` calls by `name`, or why it cannot."""
        own = self._webhooks.get(tenant_id, {}).get(name)
        if own is not None:
            return own
        tool = self._registry.get(name)
        if tool is None:
            # Also for another tenant's webhook of that name: its existence stays private.
            return Refusal.UNKNOWN_TOOL
        if not self._allows_builtin(tenant_id, tool):
            return Refusal.NOT_ALLOWED
        return Usable(tool, self._registry.semaphore(name))

    def mcp_server(self, tenant_id: str, label: str) -> McpServer | None:
        """The tenant's MCP server registered under `label`, or None."""
        tenant = (self.config.tenants or {}).get(tenant_id)
        return None if tenant is None else tenant.mcp_servers.get(label)

    def _allows_builtin(self, tenant_id: str, tool: Tool) -> bool:
        tenants = self.config.tenants
        if tenants is None:
            return True
        tenant = tenants.get(tenant_id)
        return tenant is not None and tool.name in tenant.builtins


class WebhookSlots:
    """The semaphores of webhook tools (and MCP servers), kept across reloads while
    a tool's limit is unchanged.

    Semaphores bind to the event loop that first waits on them: one per loop.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], tuple[int, asyncio.Semaphore]] = {}

    def semaphore(self, spec: WebhookSpec) -> asyncio.Semaphore:
        return self.keyed((spec.tenant_id, spec.name), spec.max_concurrency)

    def keyed(self, key: tuple[str, str], limit: int) -> asyncio.Semaphore:
        """The semaphore of `key` (a tenant and a name), new when `limit` changed."""
        kept = self._slots.get(key)
        if kept is not None and kept[0] == limit:
            return kept[1]
        semaphore = asyncio.Semaphore(limit)
        self._slots[key] = (limit, semaphore)
        return semaphore


class LiveCatalog:
    """The catalog of a tools file, re-read when the file changes.

    Args:
        path: the tools file.
        registry: the built-in tools.
        client: calls the webhooks; also receives each load's `allow_private_hosts`.
        environ: where `secret_env` variables are read.
        initial: the config already loaded from `path` at start (so start-up
            errors surface before the server starts); loaded here when None.
        check_interval_s: the file is looked at no more often than this.
        clock: monotonic seconds; tests drive it.

    Raises:
        ConfigError: (only when `initial` is None) the file does not load.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        registry: Registry,
        client: WebhookClient,
        environ: Mapping[str, str],
        initial: ToolsConfig | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        tenants_file: bool = False,
    ) -> None:
        self._path = path
        self._tenants_file = tenants_file
        self._registry = registry
        self._client = client
        self._environ = environ
        self._interval = check_interval_s
        self._clock = clock
        self._slots = WebhookSlots()
        # With `initial` loaded earlier, the file may have changed since: an
        # unknown signature makes the first check read it again.
        self._signature = _signature(path) if initial is None else None
        config = initial if initial is not None else self._load()
        self._catalog = Catalog.build(registry, config, client, self._slots)
        self._checked = clock()

    def current(self) -> Catalog:
        """The catalog in force, reloading the file first if it changed."""
        now = self._clock()
        if now - self._checked < self._interval:
            return self._catalog
        self._checked = now
        signature = _signature(self._path)
        if signature == self._signature:
            return self._catalog
        # Remember the new signature before loading: a broken file is
        # reported once, not on every check, and a fix is a new change.
        self._signature = signature
        try:
            config = self._load()
        except ConfigError as exc:
            # ConfigError messages name key paths and variables, never values.
            log.error(
                "tools file not reloaded; keeping the previous tools", extra={"error": str(exc)}
            )
            return self._catalog
        self._catalog = Catalog.build(self._registry, config, self._client, self._slots)
        tenants = config.tenants or {}
        log.info(
            "tools file reloaded",
            extra={
                "tenants": len(tenants),
                "webhooks": sum(len(t.webhooks) for t in tenants.values()),
            },
        )
        return self._catalog

    def _load(self) -> ToolsConfig:
        if self._tenants_file:
            return load_tenants_tools(self._path, self._environ, self._registry.names())
        return load_tools_file(
            self._path, environ=self._environ, builtin_names=self._registry.names()
        )


def load_tenants_tools(
    path: str | os.PathLike[str], environ: Mapping[str, str], builtin_names: Collection[str]
) -> ToolsConfig:
    """The tools part of a tenants file (docs/tenants.md): each tenant's `builtins`
    and `webhooks`, and `allow_private_hosts`, checked as a tools file would be.

    Raises:
        ConfigError: naming the file and the key path.
    """
    # Upstream keys are the broker's business: toolexec need not have them.
    directory = TenantDirectory.load(path, environ, require_env=False)
    config = parse_tools_config(
        directory.tools_document(), environ=environ, builtin_names=builtin_names
    )
    return with_mcp_servers(config, directory, environ, source=str(path))


def with_mcp_servers(
    config: ToolsConfig, directory: TenantDirectory, environ: Mapping[str, str], *, source: str
) -> ToolsConfig:
    """`config` with each tenant's MCP servers, whose header variables must be set here.

    Raises:
        ConfigError: `<source>: tenants.<id>.mcp_servers.<label>.headers_env.<header>: ...`.
    """
    if config.tenants is None:
        return config
    tenants = dict(config.tenants)
    for tenant in directory:
        if not tenant.mcp_servers:
            continue
        for server in tenant.mcp_servers.values():
            try:
                server.headers(environ)
            except ConfigError as exc:
                raise ConfigError(f"{source}: tenants.{tenant.id}.{exc}") from None
        tools = tenants.get(tenant.id, TenantTools())
        tenants[tenant.id] = replace(tools, mcp_servers=tenant.mcp_servers)
    return replace(config, tenants=tenants)


def _signature(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    # Kubernetes swaps a mounted ConfigMap by symlink: stat() follows it, and
    # the inode changes even when the new file has the same mtime and size.
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
