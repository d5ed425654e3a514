"""toolexec as an MCP client, against a real MCP server (the `mcp` SDK, its own process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import MappingProxyType
from typing import Any

import pytest

from switchboard.config import ConfigError
from switchboard.tenancy import McpServer, TenantDirectory
from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.catalog import Catalog, load_tenants_tools
from switchboard.toolexec.mcp_client import McpClient
from switchboard.toolexec.mcp_tools import McpTools
from switchboard.toolexec.service import ToolExecServicer
from switchboard.toolexec.tools_config import TenantTools, ToolsConfig
from switchboard.toolexec.webhooks import WebhookClient
from tests.mcp_support import TOKEN, McpTestServer
from tests.tenancy.documents import ENVIRON, document, write
from tests.toolexec.support import C, Stub, T, grpc_stub

HEADERS_ENV = {"Authorization": "SHOP_MCP_TOKEN"}
ENV = {"SHOP_MCP_TOKEN": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


def shop(url: str, **overrides: Any) -> McpServer:
    settings: dict[str, Any] = {"headers_env": MappingProxyType(HEADERS_ENV), "timeout_s": 2.0}
    settings.update(overrides)
    return McpServer("shop", url, **settings)


async def make_stub(
    *servers: McpServer, allow: tuple[str, ...] = ("127.0.0.1",), env: dict[str, str] = ENV
) -> AsyncIterator[tuple[Stub, ToolExecServicer]]:
    webhooks = WebhookClient()
    tools = ToolsConfig(
        tenants={"acme": TenantTools(mcp_servers={server.label: server for server in servers})},
        allow_private_hosts=frozenset(allow),
    )
    catalog = Catalog.build(builtin_registry(), tools, webhooks)
    servicer = ToolExecServicer(catalog, mcp=McpTools(McpClient(webhooks.guard, env)))
    try:
        async with grpc_stub(servicer) as stub:
            yield stub, servicer
    finally:
        await webhooks.close()


@pytest.fixture
async def stub(mcp_server: McpTestServer) -> AsyncIterator[tuple[Stub, ToolExecServicer]]:
    async for pair in make_stub(
        shop(mcp_server.url, allowed_tools=("add", "fail", "slow", "big", "lookup_order", "echo"))
    ):
        yield pair


async def call(
    stub: Stub, name: str, arguments: Any, *, call_id: str = "", label: str = "shop"
) -> Any:
    request = T.ExecuteRequest(
        tenant_id="acme",
        session_id="sess_1",
        call_id=call_id,
        name=name,
        arguments=json.dumps(arguments),
        mcp_server_label=label,
    )
    return await stub.Execute(request, timeout=15)


async def test_lists_the_allowed_tools_with_schemas_and_approval(
    mcp_server: McpTestServer,
) -> None:
    server = shop(mcp_server.url, allowed_tools=("add", "echo"), require_approval=("echo",))
    async for stub, servicer in make_stub(server):
        reply = await stub.ListMcpTools(
            T.ListMcpToolsRequest(tenant_id="acme", session_id="s", server_label="shop")
        )
        assert reply.error_code == C.ERROR_CODE_UNSPECIFIED
        assert [tool.name for tool in reply.tools] == ["add", "echo"]
        add, echo = reply.tools
        assert json.loads(add.input_schema_json)["required"] == ["a", "b"]
        assert add.description == "Add two integers."
        assert not add.requires_approval and echo.requires_approval
        listings = servicer.metrics.registry.get_sample_value(
            "switchboard_toolexec_mcp_listings_total", {"server": "shop", "result": "ok"}
        )
        assert listings == 1


async def test_an_unregistered_label_is_refused(stub: tuple[Stub, ToolExecServicer]) -> None:
    reply = await stub[0].ListMcpTools(T.ListMcpToolsRequest(tenant_id="acme", server_label="x"))
    assert reply.error_code == C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED
    # Another tenant cannot use acme's server either.
    reply = await stub[0].ListMcpTools(
        T.ListMcpToolsRequest(tenant_id="globex", server_label="shop")
    )
    assert reply.error_code == C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED
    response = await call(stub[0], "add", {"a": 1, "b": 2}, label="x")
    assert response.error_code == C.ERROR_CODE_MCP_SERVER_NOT_REGISTERED


async def test_a_call_returns_the_tool_s_result(stub: tuple[Stub, ToolExecServicer]) -> None:
    response = await call(stub[0], "add", {"a": 2, "b": 40})
    assert response.outcome == T.TOOL_OUTCOME_OK, response.error_message
    assert json.loads(response.output) == {"result": 42}
    response = await call(stub[0], "lookup_order", {"order_id": "ord_7"})
    assert json.loads(response.output) == {"order_id": "ord_7", "status": "shipped"}
    calls = stub[1].metrics.registry.get_sample_value(
        "switchboard_toolexec_calls_total", {"tool": "mcp:shop", "outcome": "ok"}
    )
    assert calls == 2


async def test_arguments_are_validated_against_the_tool_s_schema(
    stub: tuple[Stub, ToolExecServicer],
) -> None:
    response = await call(stub[0], "add", {"a": "two"})
    assert response.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert "Missing required field 'b'" in response.error_message


async def test_a_failing_tool_reports_its_error(stub: tuple[Stub, ToolExecServicer]) -> None:
    response = await call(stub[0], "fail", {})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert response.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED
    assert response.error_message.startswith("The tool 'fail' of MCP server 'shop' failed:")
    assert json.loads(response.output)["error"]["code"] == "tool_execution_failed"


async def test_a_slow_tool_hits_its_timeout(stub: tuple[Stub, ToolExecServicer]) -> None:
    response = await call(stub[0], "slow", {"seconds": 30})
    assert response.outcome == T.TOOL_OUTCOME_TIMEOUT
    assert response.error_code == C.ERROR_CODE_TOOL_TIMEOUT
    assert "did not finish within 2 s" in response.error_message


async def test_a_response_over_the_size_limit_is_refused(mcp_server: McpTestServer) -> None:
    async for stub, _ in make_stub(shop(mcp_server.url, max_response_bytes=4096)):
        response = await call(stub, "big", {"size": 10_000})
        assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
        assert "sent a response larger than 4096 bytes" in response.error_message


async def test_a_tool_the_tenant_does_not_allow_is_refused(
    stub: tuple[Stub, ToolExecServicer], mcp_server: McpTestServer
) -> None:
    response = await call(stub[0], "die", {})
    assert response.outcome == T.TOOL_OUTCOME_NOT_ALLOWED
    async for every, _ in make_stub(shop(mcp_server.url)):
        response = await call(every, "no_such_tool", {})
        assert response.outcome == T.TOOL_OUTCOME_UNKNOWN_TOOL


async def test_calls_are_idempotent_by_call_id(stub: tuple[Stub, ToolExecServicer]) -> None:
    first = await call(stub[0], "add", {"a": 1, "b": 1}, call_id="call_mcp_1")
    again = await call(stub[0], "add", {"a": 1, "b": 1}, call_id="call_mcp_1")
    assert first.outcome == again.outcome == T.TOOL_OUTCOME_OK
    assert not first.replayed and again.replayed and again.output == first.output
    other = await call(stub[0], "add", {"a": 1, "b": 2}, call_id="call_mcp_1")
    assert other.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS


async def test_a_server_that_goes_away_mid_call() -> None:
    with McpTestServer() as doomed:
        async for stub, _ in make_stub(shop(doomed.url)):
            response = await call(stub, "die", {})
            assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
            assert "'shop' could not be reached or broke off the call" in response.error_message
            # Gone for good: the next call (the listing is cached) cannot connect.
            response = await call(stub, "add", {"a": 1, "b": 2})
            assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
            assert "could not be reached" in response.error_message


async def test_private_addresses_are_refused_unless_allowed(mcp_server: McpTestServer) -> None:
    async for stub, _ in make_stub(shop(mcp_server.url), allow=()):
        request = T.ListMcpToolsRequest(tenant_id="acme", server_label="shop")
        reply = await stub.ListMcpTools(request)
        assert reply.error_code == C.ERROR_CODE_MCP_LIST_TOOLS_FAILED
        assert reply.error_message == (
            "The MCP server 'shop' was not called: destination 127.0.0.1 is a loopback address."
        )


async def test_the_configured_headers_are_sent(mcp_server: McpTestServer) -> None:
    async for stub, _ in make_stub(shop(mcp_server.url), env={"SHOP_MCP_TOKEN": "Bearer wrong"}):
        request = T.ListMcpToolsRequest(tenant_id="acme", server_label="shop")
        reply = await stub.ListMcpTools(request)
        assert reply.error_message == "The MCP server 'shop' answered HTTP 401."
        assert "wrong" not in reply.error_message and mcp_server.url not in reply.error_message


def test_the_tenants_file_gives_toolexec_its_mcp_servers(tmp_path: Any) -> None:
    data = document()
    data["tenants"]["acme"]["mcp_servers"] = {
        "shop": {"url": "https://mcp.acme.example/mcp", "headers_env": HEADERS_ENV}
    }
    path = write(tmp_path / "tenants.yaml", data)
    names = builtin_registry().names()
    config = load_tenants_tools(path, {**ENVIRON, **ENV}, names)
    assert config.tenants is not None
    assert config.tenants["acme"].mcp_servers["shop"].url == "https://mcp.acme.example/mcp"
    with pytest.raises(ConfigError) as caught:
        load_tenants_tools(path, ENVIRON, names)
    assert str(caught.value) == (
        f"{path}: tenants.acme.mcp_servers.shop.headers_env.Authorization: "
        "environment variable SHOP_MCP_TOKEN is not set"
    )
    assert TenantDirectory.load(path, ENVIRON).tenants["acme"].mcp_servers["shop"].label == "shop"
