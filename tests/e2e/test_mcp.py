"""MCP tools end to end: a tenant's registered MCP server (a real one, the `mcp` SDK,
its own process), listed and called through the real stack, with the official SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from openai import AsyncOpenAI

from switchboard.tenancy import hash_key
from tests.e2e.conftest import RealtimeClient, reply_text, tenants_file
from tests.mcp_support import TOKEN, McpTestServer
from tools.stack import Ports, Stack

ACME_KEY = "sk-sb-acme-mcp-e2e-key-0001"


def directive(**options: Any) -> str:
    return f"[[sim {orjson.dumps(options).decode()}]]"


def call(name: str, arguments: dict[str, Any]) -> str:
    return directive(tool_calls=[{"name": name, "arguments": arguments}])


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mcp_server: McpTestServer) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = f"""  acme:
    keys: ["{hash_key(ACME_KEY)}"]
    models:
      gpt-realtime: {{}}
    mcp_servers:
      shop:
        url: {mcp_server.url}
        headers_env: {{Authorization: ACME_SHOP_MCP_AUTH}}
        allowed_tools: [lookup_order, add, fail, slow, echo]
        require_approval: [echo]
        timeout_s: 2
"""
    path = tenants_file(
        Path(tmp_path_factory.mktemp("mcp")),
        ports,
        tenants,
        preamble='allow_private_hosts: ["127.0.0.1"]',
    )
    stack = Stack(
        ports=ports,
        extra_env={
            "SWITCHBOARD_TENANTS_FILE": str(path),
            "ACME_SHOP_MCP_AUTH": f"Bearer {TOKEN}",
        },
    )
    with stack:
        yield stack
    # Neither the server's credentials nor its URL are ever logged.
    mcp_server.assert_not_logged(stack.log_dir)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[RealtimeClient]:
    async with websockets.connect(
        f"{stack.websocket_url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {ACME_KEY}"},
    ) as connection:
        client = RealtimeClient(connection)
        assert (await client.recv())["type"] == "session.created"
        yield client


SHOP = {"type": "mcp", "server_label": "shop", "require_approval": "never"}


async def offer(client: RealtimeClient, *tools: dict[str, Any]) -> list[dict[str, Any]]:
    """`session.update` with `tools`; the events up to the last listing's end."""
    await client.send(
        {"type": "session.update", "session": {"type": "realtime", "tools": list(tools)}}
    )
    events = await client.recv_until("session.updated")
    listed = 0
    while listed < len(tools):
        event = await client.recv(timeout_s=15)
        events.append(event)
        if event["type"] in ("mcp_list_tools.completed", "mcp_list_tools.failed"):
            listed += 1
    events.append(await client.recv())  # the item's conversation.item.done (or the error)
    return events


async def until_done(client: RealtimeClient, responses: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(responses):
        events += await client.recv_until("response.done", timeout_s=30)
    return events


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["type"] == kind]


async def test_the_official_sdk_completes_a_turn_with_an_mcp_tool(stack: Stack) -> None:
    client = AsyncOpenAI(
        api_key=ACME_KEY, websocket_base_url=f"ws://127.0.0.1:{stack.ports.gateway}/v1"
    )
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.session.update(
            session={"type": "realtime", "tools": [SHOP]}  # type: ignore[list-item]
        )
        kinds: list[str] = []
        listing: Any = None
        while "mcp_list_tools.completed" not in kinds or listing is None:
            event = await asyncio.wait_for(connection.recv(), 15)
            kinds.append(event.type)
            if event.type == "conversation.item.done" and event.item.type == "mcp_list_tools":
                listing = event.item
        assert kinds[:3] == [
            "session.updated",
            "conversation.item.added",
            "mcp_list_tools.in_progress",
        ]
        assert sorted(tool.name for tool in listing.tools) == [
            "add",
            "echo",
            "fail",
            "lookup_order",
            "slow",
        ]
        text = "Where is order ord_7? " + call("shop__lookup_order", {"order_id": "ord_7"})
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        )
        await connection.response.create()
        events: list[Any] = []
        answer = ""
        done = 0
        while done < 2:
            event = await asyncio.wait_for(connection.recv(), 30)
            events.append(event)
            if event.type == "response.output_text.delta":
                answer += event.delta
            elif event.type == "response.done":
                done += 1
        kinds = [event.type for event in events]
        for kind in (
            "response.mcp_call_arguments.delta",
            "response.mcp_call_arguments.done",
            "response.mcp_call.in_progress",
            "response.mcp_call.completed",
        ):
            assert kind in kinds, kinds
        assert kinds.index("response.mcp_call.completed") < kinds.index("response.done")
        first = next(event for event in events if event.type == "response.done").response
        assert first.status == "completed"
        (mcp_call,) = first.output
        assert mcp_call.type == "mcp_call" and mcp_call.server_label == "shop"
        assert mcp_call.name == "lookup_order" and json.loads(mcp_call.arguments) == {
            "order_id": "ord_7"
        }
        assert json.loads(mcp_call.output) == {"order_id": "ord_7", "status": "shipped"}
        assert mcp_call.error is None
        # The follow-up response: the model read the tool's result.
        assert answer.startswith(
            'tool shop__lookup_order returned {"order_id":"ord_7","status":"shipped"}'
        )
    await client.close()


async def test_a_failing_tool_ends_its_call_failed(client: RealtimeClient) -> None:
    await offer(client, SHOP)
    await client.say("fail please " + call("shop__fail", {}))
    await client.send({"type": "response.create"})
    events = await until_done(client, 2)
    assert of_type(events, "response.mcp_call.failed")
    item = of_type(events, "response.output_item.done")[0]["item"]
    assert item["type"] == "mcp_call" and item["output"] is None
    assert item["error"]["type"] == "tool_execution_error"
    assert item["error"]["message"].startswith("The tool 'fail' of MCP server 'shop' failed:")
    assert "tool shop__fail returned" in reply_text(events)


async def test_a_slow_tool_hits_its_timeout(client: RealtimeClient) -> None:
    await offer(client, SHOP)
    await client.say("wait " + call("shop__slow", {"seconds": 30}))
    await client.send({"type": "response.create"})
    events = await until_done(client, 2)
    item = of_type(events, "response.output_item.done")[0]["item"]
    assert item["error"]["message"] == "The tool 'shop__slow' did not finish within 2 s."


async def test_approval_granted_runs_the_call_in_the_next_response(client: RealtimeClient) -> None:
    await offer(client, {"type": "mcp", "server_label": "shop", "require_approval": "always"})
    await client.say("add " + call("shop__add", {"a": 2, "b": 3}))
    await client.send({"type": "response.create"})
    events = await until_done(client, 1)
    request = of_type(events, "response.output_item.done")[0]["item"]
    assert request["type"] == "mcp_approval_request"
    assert (request["server_label"], request["name"]) == ("shop", "add")
    assert json.loads(request["arguments"]) == {"a": 2, "b": 3}
    assert not of_type(events, "response.mcp_call.in_progress")  # nothing ran
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "mcp_approval_response",
                "approval_request_id": request["id"],
                "approve": True,
            },
        }
    )
    added = (await client.recv_until("conversation.item.done"))[-1]["item"]
    assert added["type"] == "mcp_approval_response" and added["approve"] is True
    await client.send({"type": "response.create"})
    events = await until_done(client, 1)
    done = events[-1]["response"]
    mcp_call, message = done["output"]
    assert mcp_call["type"] == "mcp_call" and mcp_call["approval_request_id"] == request["id"]
    assert json.loads(mcp_call["output"]) == {"result": 5}
    assert message["type"] == "message"
    assert reply_text(events).startswith('tool shop__add returned {"result":5}')


async def test_approval_denied_runs_nothing(client: RealtimeClient) -> None:
    # The tenant's policy asks for approval of `echo`, whatever the client says.
    await offer(client, SHOP)
    await client.say("echo " + call("shop__echo", {"text": "hi"}))
    await client.send({"type": "response.create"})
    request = of_type(await until_done(client, 1), "response.output_item.done")[0]["item"]
    assert request["type"] == "mcp_approval_request"
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "mcp_approval_response",
                "approval_request_id": request["id"],
                "approve": False,
                "reason": "not now",
            },
        }
    )
    await client.recv_until("conversation.item.done")
    await client.send({"type": "response.create"})
    events = await until_done(client, 1)
    mcp_call = events[-1]["response"]["output"][0]
    assert mcp_call["type"] == "mcp_call" and mcp_call["output"] is None
    assert mcp_call["error"]["message"].startswith("The user did not approve this call")
    assert not of_type(events, "response.mcp_call.in_progress")
    assert "tool shop__echo returned" in reply_text(events)


class Listener:
    """A TCP listener that counts connections: a URL nobody may fetch."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/mcp"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_an_unregistered_server_is_refused_and_never_fetched(client: RealtimeClient) -> None:
    async with Listener() as listener:
        cases = [
            (
                {"type": "mcp", "server_label": "evil", "server_url": listener.url},
                "session.tools[0].server_url",
            ),
            (
                {"type": "mcp", "server_label": "shop", "server_url": listener.url},
                "session.tools[0].server_url",
            ),
            ({"type": "mcp", "server_label": "crm"}, "session.tools[0].server_label"),
        ]
        for tool, param in cases:
            await client.send(
                {"type": "session.update", "session": {"type": "realtime", "tools": [tool]}}
            )
            error = (await client.recv_until("error"))[-1]["error"]
            assert (error["code"], error["param"]) == ("mcp_server_not_registered", param)
            assert listener.url not in error["message"]
        await client.send(
            {
                "type": "response.create",
                "response": {
                    "tools": [{"type": "mcp", "server_label": "x", "server_url": listener.url}]
                },
            }
        )
        error = (await client.recv_until("error"))[-1]["error"]
        assert (error["code"], error["param"]) == (
            "mcp_server_not_registered",
            "response.tools[0].server_url",
        )
        # Credentials come from the tenants file, never from the client.
        await client.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "tools": [{**SHOP, "headers": {"X": "y"}}]},
            }
        )
        error = (await client.recv_until("error"))[-1]["error"]
        assert (error["code"], error["param"]) == (
            "unsupported_feature",
            "session.tools[0].headers",
        )
        await asyncio.sleep(0.2)
        assert listener.connections == 0


async def test_the_registered_url_names_the_server(
    client: RealtimeClient, mcp_server: McpTestServer
) -> None:
    events = await offer(
        client,
        {
            "type": "mcp",
            "server_label": "any",
            "server_url": mcp_server.url,
            "require_approval": "never",
        },
    )
    listing = of_type(events, "conversation.item.done")[-1]["item"]
    assert listing["type"] == "mcp_list_tools" and listing["server_label"] == "shop"


async def test_function_tools_and_instructions_survive_beside_an_mcp_tool(
    client: RealtimeClient,
) -> None:
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    await client.send(
        {
            "type": "session.update",
            "session": {"type": "realtime", "instructions": "Be brief.", "tools": [weather, SHOP]},
        }
    )
    updated = (await client.recv_until("session.updated"))[-1]["session"]
    assert updated["instructions"] == "Be brief."
    assert [tool["type"] for tool in updated["tools"]] == ["function", "mcp"]
    await client.recv_until("mcp_list_tools.completed", timeout_s=15)


async def test_an_agents_sdk_realtime_app_runs_an_mcp_call_beside_its_function_tool(
    stack: Stack,
) -> None:
    """The Agents SDK (0.24.0) refuses a HostedMCPTool on a RealtimeAgent before
    sending anything, so the app adds the MCP tool with a raw `session.update` (its
    function tool and instructions stay): the SDK then reads the MCP events and items."""
    from agents import function_tool
    from agents.realtime import RealtimeAgent, RealtimeRunner
    from agents.realtime.model_inputs import RealtimeModelSendRawMessage

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"snow in {city}"

    agent = RealtimeAgent(name="Shop", instructions="Answer briefly.", tools=[get_weather])
    runner = RealtimeRunner(
        starting_agent=agent,
        config={"model_settings": {"model_name": "gpt-realtime", "output_modalities": ["text"]}},
    )
    session = await runner.run(
        model_config={"url": f"{stack.websocket_url}?model=gpt-realtime", "api_key": ACME_KEY}
    )
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": get_weather.params_json_schema,
    }
    errors: list[Any] = []
    raw: list[str] = []
    answer = ""
    async with session:
        await session.model.send_event(
            RealtimeModelSendRawMessage(
                message={
                    "type": "session.update",
                    "other_data": {
                        "session": {"type": "realtime", "tools": [weather, SHOP]},
                    },
                }
            )
        )

        async def read() -> None:
            nonlocal answer
            async for event in session:
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "raw_model_event":
                    data = event.data
                    kind = getattr(data, "type", None)
                    if kind == "raw_server_event":
                        raw.append(str(getattr(data, "data", {}).get("type")))
                        if raw[-1] == "mcp_list_tools.completed":
                            await session.send_message(
                                "Where is ord_7? "
                                + call("shop__lookup_order", {"order_id": "ord_7"})
                            )
                    elif kind == "output_text_delta":
                        answer += data.delta
                    elif kind == "turn_ended" and answer:
                        return

        await asyncio.wait_for(read(), 30)
    assert not errors, errors
    assert "response.mcp_call.completed" in raw
    assert answer.startswith('tool shop__lookup_order returned {"order_id":"ord_7"')
