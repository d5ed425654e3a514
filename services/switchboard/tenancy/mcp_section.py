"""The `mcp_servers:` section of a tenant: the remote MCP servers its clients may use.

Each server is registered under a label with its streamable-HTTP URL, the
headers sent to it (their values read from environment variables by toolexec,
never written in the file), which of its tools the tenant allows, which calls
need the client's approval, and its timeouts and size limits
(docs/toolexec.md#mcp-servers). A client may name only a registered server, by
its label or by exactly its URL: the gateway never fetches anything else.

Errors are one `ConfigError("<key path>: <problem>")`; no message quotes a URL,
a header value or the value of a variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from switchboard.config import ConfigError, Secret
from switchboard.key_paths import KeyPath
from switchboard.tenancy.yaml_checks import (
    count,
    env_name,
    error,
    http_url,
    mapping,
    seconds,
    sequence,
    string,
)

# A label is sent by clients (`server_label`) and prefixes the names the model
# sees (`<label>__<tool>`, at most 64 characters): short and plain.
MCP_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
# MCP tool names, as the specification allows them.
MCP_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Headers toolexec sets itself, or that would change how the request is framed.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "accept",
        "accept-encoding",
        "mcp-session-id",
        "mcp-protocol-version",
    }
)
MAX_DESCRIPTION_CHARS = 1024
MAX_TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_CONCURRENCY = 1024
MAX_TOOLS_TTL_S = 3600.0
MAX_SERVERS = 32

APPROVAL_MODES = ("never", "always")

_SERVER_KEYS = (
    "url",
    "description",
    "headers_env",
    "allowed_tools",
    "require_approval",
    "timeout_s",
    "list_timeout_s",
    "max_response_bytes",
    "max_concurrency",
    "tools_ttl_s",
)


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class McpServer:
    """One remote MCP server a tenant registered.

    Attributes:
        label: how clients and the model name it (`server_label`).
        url: its streamable-HTTP endpoint; never logged or put in a message.
        description: what it is for, shown to the model with its tools.
        headers_env: header name -> environment variable holding its value.
        allowed_tools: the tool names the tenant allows; None for all of them.
        require_approval: "never", "always", or the tool names whose calls
            need the client's approval.
        timeout_s: longest a call may take, waiting for a free slot included.
        list_timeout_s: longest listing the tools may take.
        max_response_bytes: a larger HTTP body from the server is refused.
        max_concurrency: calls to the server at once, per toolexec process.
        tools_ttl_s: how long toolexec keeps a listing before asking again.
    """

    label: str
    url: str = field(repr=False)
    description: str = ""
    headers_env: Mapping[str, str] = field(default_factory=_no_headers)
    allowed_tools: tuple[str, ...] | None = None
    require_approval: str | tuple[str, ...] = "never"
    timeout_s: float = 10.0
    list_timeout_s: float = 10.0
    max_response_bytes: int = 256 * 1024
    max_concurrency: int = 16
    tools_ttl_s: float = 300.0

    def allows(self, tool: str) -> bool:
        """Whether the tenant lets its clients call `tool` on this server."""
        return self.allowed_tools is None or tool in self.allowed_tools

    def needs_approval(self, tool: str) -> bool:
        """Whether the tenant's policy asks for the client's approval of a call of `tool`."""
        if isinstance(self.require_approval, tuple):
            return tool in self.require_approval
        return self.require_approval == "always"

    def headers(self, environ: Mapping[str, str]) -> dict[str, Secret]:
        """The headers sent to the server, their values read from `environ`.

        Raises:
            ConfigError: a variable is unset or empty (named, never quoted).
        """
        values: dict[str, Secret] = {}
        for header, variable in self.headers_env.items():
            value = environ.get(variable)
            if not value:
                raise ConfigError(
                    f"mcp_servers.{self.label}.headers_env.{header}: "
                    f"environment variable {variable} is not set"
                )
            if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
                raise ConfigError(
                    f"mcp_servers.{self.label}.headers_env.{header}: environment variable "
                    f"{variable} holds a control character, which no header may carry"
                )
            values[header] = Secret(value)
        return values


def parse_mcp_servers(raw: Any, path: KeyPath) -> Mapping[str, McpServer]:
    """A tenant's `mcp_servers:` mapping, by label ({} when absent).

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        return MappingProxyType({})
    entries = mapping(raw, path)
    if len(entries) > MAX_SERVERS:
        raise error(path, f"must register at most {MAX_SERVERS} servers")
    servers: dict[str, McpServer] = {}
    urls: dict[str, str] = {}
    for label, body in entries.items():
        if not isinstance(label, str) or not MCP_LABEL.fullmatch(label):
            raise error(
                (*path, str(label)[:64]),
                f"server labels must be strings matching {MCP_LABEL.pattern}",
            )
        server = _server(label, body, (*path, label))
        other = urls.get(server.url)
        if other is not None:
            # A URL names one server: a client naming it by URL must get one label.
            raise error((*path, label, "url"), f"is also the url of server {other!r}")
        urls[server.url] = label
        servers[label] = server
    return MappingProxyType(servers)


def _server(label: str, raw: Any, path: KeyPath) -> McpServer:
    fields = mapping(raw, path, _SERVER_KEYS)
    if "url" not in fields:
        raise error((*path, "url"), "is required")
    description = fields.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise error(
            (*path, "description"),
            f"must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
        )
    return McpServer(
        label=label,
        url=_url(fields["url"], (*path, "url")),
        description=description,
        headers_env=_headers_env(fields.get("headers_env"), (*path, "headers_env")),
        allowed_tools=_allowed_tools(fields.get("allowed_tools"), (*path, "allowed_tools")),
        require_approval=_approval(fields.get("require_approval"), (*path, "require_approval")),
        timeout_s=_bounded_seconds(fields, "timeout_s", path, 10.0),
        list_timeout_s=_bounded_seconds(fields, "list_timeout_s", path, 10.0),
        max_response_bytes=_bounded_count(
            fields, "max_response_bytes", path, 256 * 1024, MAX_RESPONSE_BYTES
        ),
        max_concurrency=_bounded_count(fields, "max_concurrency", path, 16, MAX_CONCURRENCY),
        tools_ttl_s=_ttl(fields.get("tools_ttl_s"), (*path, "tools_ttl_s")),
    )


def _url(raw: Any, path: KeyPath) -> str:
    parts = http_url(raw, path)
    if parts.username is not None or parts.password is not None or parts.fragment:
        # Credentials belong in headers_env, which keeps them out of the file.
        raise error(path, "must not hold credentials or a fragment (put them in headers_env)")
    url = str(raw)
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise error(path, "must not contain spaces or control characters")
    return url


def _headers_env(raw: Any, path: KeyPath) -> Mapping[str, str]:
    if raw is None:
        return MappingProxyType({})
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, variable in mapping(raw, path).items():
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise error((*path, str(name)[:64]), "must be an HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise error((*path, name), "is set by toolexec itself and cannot be configured")
        if name.lower() in seen:
            raise error((*path, name), "is listed twice (header names ignore case)")
        seen.add(name.lower())
        headers[name] = env_name(variable, (*path, name))
    return MappingProxyType(headers)


def _tool_names(raw: Any, path: KeyPath) -> tuple[str, ...]:
    names: list[str] = []
    for index, item in enumerate(sequence(raw, path)):
        name = string(item, (*path, index))
        if not MCP_TOOL_NAME.fullmatch(name):
            raise error((*path, index), f"must match {MCP_TOOL_NAME.pattern}")
        if name in names:
            raise error((*path, index), f"{name!r} is listed twice")
        names.append(name)
    return tuple(names)


def _allowed_tools(raw: Any, path: KeyPath) -> tuple[str, ...] | None:
    return None if raw is None else _tool_names(raw, path)


def _approval(raw: Any, path: KeyPath) -> str | tuple[str, ...]:
    if raw is None:
        return "never"
    if isinstance(raw, list):
        return _tool_names(raw, path)
    if raw not in APPROVAL_MODES:
        raise error(path, "must be 'never', 'always' or a list of tool names")
    return str(raw)


def _bounded_seconds(fields: Mapping[str, Any], key: str, path: KeyPath, default: float) -> float:
    value = seconds(fields.get(key), (*path, key))
    if value is None:
        return default
    if value > MAX_TIMEOUT_S:
        raise error((*path, key), f"must be at most {MAX_TIMEOUT_S:.0f} seconds")
    return value


def _bounded_count(
    fields: Mapping[str, Any], key: str, path: KeyPath, default: int, ceiling: int
) -> int:
    value = count(fields.get(key), (*path, key))
    if value is None:
        return default
    if value > ceiling:
        raise error((*path, key), f"must be at most {ceiling}")
    return value


def _ttl(raw: Any, path: KeyPath) -> float:
    value = seconds(raw, path)
    if value is None:
        return 300.0
    if value > MAX_TOOLS_TTL_S:
        raise error(path, f"must be at most {MAX_TOOLS_TTL_S:.0f} seconds")
    return value
