"""A tenant's `mcp_servers:` and `moderation:` sections, and an error for every mistake."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.config import ConfigError
from switchboard.tenancy import TenantDirectory
from tests.tenancy.documents import ENVIRON, document

SERVER_URL = "https://mcp.acme.example/mcp?team=7"
TOKEN = "mcp-bearer-token-value-0004"


def with_servers(servers: Any) -> dict[str, Any]:
    data = document()
    data["tenants"]["acme"]["mcp_servers"] = servers
    return data


def test_a_full_entry_is_read_with_its_defaults() -> None:
    directory = TenantDirectory.parse(
        with_servers(
            {
                "docs": {
                    "url": SERVER_URL,
                    "description": "Acme's docs",
                    "headers_env": {"Authorization": "ACME_MCP_TOKEN"},
                    "allowed_tools": ["search", "fetch.page"],
                    "require_approval": ["fetch.page"],
                    "timeout_s": 3,
                },
                "crm": {"url": "http://crm.internal:8080/mcp"},
            }
        ),
        ENVIRON,
    )
    acme = directory.tenants["acme"]
    docs, crm = acme.mcp_servers["docs"], acme.mcp_servers["crm"]
    assert docs.url == SERVER_URL and docs.timeout_s == 3.0 and docs.list_timeout_s == 10.0
    assert docs.allows("search") and not docs.allows("delete")
    assert docs.needs_approval("fetch.page") and not docs.needs_approval("search")
    assert crm.allows("anything") and not crm.needs_approval("anything")
    assert crm.max_response_bytes == 256 * 1024 and crm.max_concurrency == 16
    assert directory.tenants["beta"].mcp_servers == {}
    # The URL is never in a repr (it may carry a tenant's secret path or query).
    assert SERVER_URL not in repr(acme) and SERVER_URL not in repr(docs)
    headers = docs.headers({"ACME_MCP_TOKEN": TOKEN})
    assert headers["Authorization"].reveal() == TOKEN and TOKEN not in repr(headers)


def test_require_approval_always() -> None:
    directory = TenantDirectory.parse(
        with_servers({"docs": {"url": SERVER_URL, "require_approval": "always"}}), ENVIRON
    )
    assert directory.tenants["acme"].mcp_servers["docs"].needs_approval("search")


def test_a_header_variable_that_is_not_set_is_named_by_toolexec_s_check() -> None:
    directory = TenantDirectory.parse(
        with_servers({"docs": {"url": SERVER_URL, "headers_env": {"X-Key": "NOPE"}}}), ENVIRON
    )
    with pytest.raises(ConfigError) as caught:
        directory.tenants["acme"].mcp_servers["docs"].headers({})
    assert str(caught.value) == (
        "mcp_servers.docs.headers_env.X-Key: environment variable NOPE is not set"
    )


BAD: list[tuple[Any, str]] = [
    ([], "tenants.acme.mcp_servers: must be a mapping"),
    ({"bad label!": {"url": SERVER_URL}}, "server labels must be strings matching"),
    ({"docs": {}}, "tenants.acme.mcp_servers.docs.url: is required"),
    ({"docs": {"url": "ftp://x/mcp"}}, "mcp_servers.docs.url: must be an http(s) URL"),
    (
        {"docs": {"url": "https://user:pw@x.example/mcp"}},
        "mcp_servers.docs.url: must not hold credentials or a fragment",
    ),
    ({"docs": {"url": SERVER_URL, "colour": 1}}, "mcp_servers.docs.colour: unknown key"),
    (
        {"docs": {"url": SERVER_URL, "headers_env": {"Host": "X"}}},
        "headers_env.Host: is set by toolexec itself",
    ),
    (
        {"docs": {"url": SERVER_URL, "headers_env": {"X-Key": "not a name"}}},
        "headers_env.X-Key: must be an environment variable name",
    ),
    (
        {"docs": {"url": SERVER_URL, "require_approval": "sometimes"}},
        "require_approval: must be 'never', 'always' or a list of tool names",
    ),
    (
        {"docs": {"url": SERVER_URL, "allowed_tools": ["a", "a"]}},
        "allowed_tools[1]: 'a' is listed twice",
    ),
    ({"docs": {"url": SERVER_URL, "timeout_s": 600}}, "timeout_s: must be at most 60 seconds"),
    ({"docs": {"url": SERVER_URL, "timeout_s": 0}}, "timeout_s: must be a number of seconds"),
    (
        {"docs": {"url": SERVER_URL, "max_response_bytes": 10**9}},
        "max_response_bytes: must be at most 4194304",
    ),
    (
        {"a": {"url": SERVER_URL}, "b": {"url": SERVER_URL}},
        "mcp_servers.b.url: is also the url of server 'a'",
    ),
]


@pytest.mark.parametrize(("servers", "message"), BAD)
def test_a_bad_entry_is_one_line_naming_its_key_path(servers: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.parse(with_servers(servers), ENVIRON)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert "pw@" not in text and "team=7" not in text


def with_moderation(policy: Any) -> dict[str, Any]:
    data = document()
    data["tenants"]["acme"]["moderation"] = policy
    return data


def test_a_moderation_policy_is_read_with_its_defaults() -> None:
    directory = TenantDirectory.parse(
        with_moderation({"mode": "input_output", "categories": ["violence"], "hold_back_chars": 0}),
        ENVIRON,
    )
    policy = directory.tenants["acme"].moderation
    assert policy.checks_input and policy.checks_output
    assert (policy.window_chars, policy.overlap_chars, policy.hold_back_chars) == (400, 100, 0)
    assert policy.blocks(True, ["violence", "hate"]) == ["violence"]
    assert policy.blocks(True, ["hate"]) is None
    assert directory.tenants["beta"].moderation.mode == "off"
    # YAML 1.1 reads an unquoted `off` as false: it means off.
    assert TenantDirectory.parse(with_moderation({"mode": False}), ENVIRON)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"mode": "sometimes"}, "moderation.mode: must be one of: off, input, input_output"),
        ({"mode": "input", "upstream": "nope"}, "moderation.upstream: no upstream named 'nope'"),
        ({"mode": "input", "categories": []}, "moderation.categories: must list at least one"),
        ({"mode": "input", "window_chars": 0}, "moderation.window_chars: must be a positive"),
        ({"mode": "input", "timeout_s": 90}, "moderation.timeout_s: must be at most 30 seconds"),
        ({"mode": "input", "colour": 1}, "moderation.colour: unknown key"),
    ],
)
def test_a_bad_moderation_policy_is_named(policy: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.parse(with_moderation(policy), ENVIRON)
    assert message in str(caught.value)
