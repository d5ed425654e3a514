"""`{"type": "mcp", ...}` tools in `session.tools` and `response.tools`, as pure functions.

A client may offer the model only MCP servers its tenant registered in the
tenants file: it names one by `server_label`, and a `server_url`, when it sends
one, must be exactly the URL registered under that label (or, with a label the
tenant did not register, exactly the URL of one it did: the server is then
known by its registered label). Anything else is `mcp_server_not_registered`,
decided here, before any I/O: no URL a client sends is ever fetched. Headers
and credentials come from the tenants file, never from the client.

`split_tools` parses a whole `tools` array into its function tools and its MCP
servers (`McpToolConfig`, what the session stores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from switchboard.errors import InvalidRequest, invalid_value, quote
from switchboard.gateway import bounds, fields
from switchboard.tenancy import McpServer
from switchboard.tenancy.mcp_section import MCP_TOOL_NAME
from switchboard.v1 import common_pb2

_C = common_pb2
Servers = Mapping[str, McpServer]

MCP_FIELDS = frozenset(
    {
        "type",
        "server_label",
        "server_url",
        "server_description",
        "allowed_tools",
        "require_approval",
        "headers",
        "authorization",
        "connector_id",
        "tunnel_id",
    }
)
# Fields that would make Switchboard reach a server, or send credentials, the
# tenant did not configure.
_CLIENT_CREDENTIALS = ("headers", "authorization")
_OTHER_SERVERS = ("connector_id", "tunnel_id")


def split_tools(
    value: Any, param: str, servers: Servers
) -> tuple[list[common_pb2.ToolDefinition], list[common_pb2.McpToolConfig]]:
    """A `tools` array: its function tools and its MCP servers, in order.

    Args:
        value: the array as the client sent it.
        param: where it is (`session.tools`), for error params.
        servers: the tenant's registered MCP servers by label.

    Raises:
        InvalidRequest: naming the offending field; `mcp_server_not_registered`
            for a server the tenant did not register.
    """
    functions: list[common_pb2.ToolDefinition] = []
    mcp: list[common_pb2.McpToolConfig] = []
    for index, raw in enumerate(fields.tool_list(value, param)):
        where = f"{param}[{index}]"
        if isinstance(raw, dict) and raw.get("type") == "mcp":
            config = mcp_tool(raw, where, servers)
            if any(other.server_label == config.server_label for other in mcp):
                raise invalid_value(
                    f"{where}.server_label",
                    f"The MCP server {quote(config.server_label)} is listed twice.",
                )
            mcp.append(config)
        else:
            functions.append(fields.function_tool(raw, where))
    return functions, mcp


def mcp_tool(raw: dict[str, Any], where: str, servers: Servers) -> common_pb2.McpToolConfig:
    """One `{"type": "mcp"}` tool, resolved to a registered server."""
    fields.reject_unknown(raw, MCP_FIELDS, where)
    for key in _CLIENT_CREDENTIALS:
        if raw.get(key) is not None:
            raise InvalidRequest(
                f"'{where}.{key}' is not accepted: the credentials of an MCP server are "
                "configured for your tenant on the server side.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{where}.{key}",
            )
    for key in _OTHER_SERVERS:
        if raw.get(key) is not None:
            raise InvalidRequest(
                f"'{where}.{key}' is not supported: name an MCP server your tenant registered.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{where}.{key}",
            )
    label = fields.require_str(raw, "server_label", where)
    bounds.check_chars(label, f"{where}.server_label", 64)
    url = fields.optional_str(raw, "server_url", where)
    server = resolve(label, url, where, servers)
    config = common_pb2.McpToolConfig(server_label=server.label, server_url=url)
    description = fields.optional_str(raw, "server_description", where)
    config.server_description = bounds.check_chars(
        description, f"{where}.server_description", bounds.MAX_TOOL_DESCRIPTION_CHARS
    )
    if raw.get("allowed_tools") is not None:
        config.allowed_tools_set = True
        config.allowed_tools.extend(_allowed(raw["allowed_tools"], f"{where}.allowed_tools"))
    _approval(raw.get("require_approval"), f"{where}.require_approval", config)
    return config


def resolve(label: str, url: str, where: str, servers: Servers) -> McpServer:
    """The registered server a client names, or `mcp_server_not_registered`.

    Messages never quote the URL a client sent, nor a registered one.
    """
    server = servers.get(label)
    if server is not None:
        if url and url != server.url:
            raise _not_registered(
                f"'{where}.server_url' is not the URL registered for the MCP server "
                f"{quote(label)}; omit it, or send exactly the registered URL.",
                f"{where}.server_url",
            )
        return server
    if url:
        for registered in servers.values():
            if registered.url == url:
                return registered
        raise _not_registered(
            f"The MCP server at '{where}.server_url' is not registered for your tenant; "
            "only the servers in its configuration can be used, and nothing else is fetched.",
            f"{where}.server_url",
        )
    raise _not_registered(
        f"No MCP server labelled {quote(label)} is registered for your tenant.",
        f"{where}.server_label",
    )


def _not_registered(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, code=_C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED, param=param)


def _tool_names(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or len(value) > bounds.MAX_TOOLS:
        raise invalid_value(
            param, f"Invalid value for '{param}': expected at most {bounds.MAX_TOOLS} tool names."
        )
    names = []
    for index, name in enumerate(value):
        if not isinstance(name, str) or not MCP_TOOL_NAME.fullmatch(name):
            raise invalid_value(
                f"{param}[{index}]",
                f"Invalid value for '{param}[{index}]': expected a tool name "
                "(1-128 letters, digits, '_', '.' or '-').",
            )
        names.append(name)
    return names


def _allowed(value: Any, param: str) -> list[str]:
    """`allowed_tools`: a list of names, or `{"tool_names": [...]}`."""
    if isinstance(value, dict):
        fields.reject_unknown(value, frozenset({"tool_names", "read_only"}), param)
        if value.get("read_only") is not None:
            raise InvalidRequest(
                f"'{param}.read_only' is not supported; list the tools in 'tool_names'.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{param}.read_only",
            )
        return _tool_names(value.get("tool_names") or [], f"{param}.tool_names")
    return _tool_names(value, param)


def _approval(value: Any, param: str, config: common_pb2.McpToolConfig) -> None:
    """`require_approval`: "always" (the default, as OpenAI's), "never", or
    `{"always": {"tool_names": [...]}, "never": {"tool_names": [...]}}`: a tool in
    neither list needs approval unless only `always` is given."""
    if value is None or value == "always":
        config.require_approval = "always"
        return
    if value == "never":
        config.require_approval = "never"
        return
    if not isinstance(value, dict):
        raise invalid_value(
            param,
            f"Invalid value for '{param}': expected 'always', 'never' or an object with "
            "'always' and 'never' tool filters.",
        )
    fields.reject_unknown(value, frozenset({"always", "never"}), param)
    config.require_approval = "always"
    for key, target in (("always", config.approval_tools), ("never", config.no_approval_tools)):
        node = value.get(key)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise invalid_value(f"{param}.{key}", f"Invalid type for '{param}.{key}'.")
        fields.reject_unknown(node, frozenset({"tool_names", "read_only"}), f"{param}.{key}")
        if node.get("read_only") is not None:
            raise InvalidRequest(
                f"'{param}.{key}.read_only' is not supported; list the tools in 'tool_names'.",
                code=_C.ERROR_CODE_UNSUPPORTED_FEATURE,
                param=f"{param}.{key}.read_only",
            )
        target.extend(_tool_names(node.get("tool_names") or [], f"{param}.{key}.tool_names"))


def client_wants_approval(config: common_pb2.McpToolConfig, tool: str) -> bool:
    """Whether the client asked to approve calls of `tool` (the tenant's policy may
    ask too: `McpTool.requires_approval`)."""
    if tool in config.approval_tools:
        return True
    if tool in config.no_approval_tools:
        return False
    if config.approval_tools and not config.no_approval_tools:
        # Only an `always` filter: the tools it names need approval, no others.
        return False
    return config.require_approval != "never"


def client_allows(config: common_pb2.McpToolConfig, tool: str) -> bool:
    """Whether the client's `allowed_tools` lets the model see `tool`."""
    return not config.allowed_tools_set or tool in config.allowed_tools
