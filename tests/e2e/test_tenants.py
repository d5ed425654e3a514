"""Two tenants from a tenants file: models, session defaults, tools and data stay apart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from openai import AsyncOpenAI, PermissionDeniedError

from switchboard.tenancy import hash_key, new_key
from tests.e2e.conftest import RealtimeClient, reply_text
from tools.stack import Ports, Stack

ACME_KEY, GLOBEX_KEY, GONE_KEY = new_key(), new_key(), new_key()
TENANTS = """
upstreams:
  default:
    base_url: http://127.0.0.1:{simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
tenants:
  acme:
    keys: ["{acme}"]
    models:
      gpt-realtime: {{upstream: default}}
    builtins: [calculate]
    limits: {{max_output_tokens: 6}}
    session: {{instructions: "You are Acme's assistant."}}
  globex:
    keys: ["{globex}"]
    models:
      fast: {{upstream: default, upstream_model: sim-small}}
    builtins: []
"""
GONE = """
  gone:
    keys: ["{gone}"]
    models:
      gpt-realtime: {{upstream: default}}
"""


def tenants_document(simulator: int, *, with_gone: bool) -> str:
    keys = {"acme": hash_key(ACME_KEY), "globex": hash_key(GLOBEX_KEY), "gone": hash_key(GONE_KEY)}
    document = TENANTS.format(simulator=simulator, **keys)
    return document + GONE.format(**keys) if with_gone else document


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports.free()
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(tenants_document(ports.simulator, with_gone=True))
    stack = Stack(ports=ports, extra_env={"SWITCHBOARD_TENANTS_FILE": str(tenants)})
    with stack:
        yield stack


async def open_client(stack: Stack, key: str, model: str) -> RealtimeClient:
    connection = await websockets.connect(
        f"{stack.websocket_url}?model={model}",
        additional_headers={"Authorization": f"Bearer {key}"},
    )
    client = RealtimeClient(connection)
    created = await client.recv()
    assert created["type"] == "session.created"
    client.session = created["session"]  # type: ignore[attr-defined]
    return client


@pytest.fixture
async def acme(stack: Stack) -> AsyncIterator[RealtimeClient]:
    client = await open_client(stack, ACME_KEY, "gpt-realtime")
    yield client
    await client.connection.close()


@pytest.fixture
async def globex(stack: Stack) -> AsyncIterator[RealtimeClient]:
    client = await open_client(stack, GLOBEX_KEY, "fast")
    yield client
    await client.connection.close()


async def test_session_defaults_and_output_cap(acme: RealtimeClient) -> None:
    assert acme.session["instructions"] == "You are Acme's assistant."  # type: ignore[attr-defined]
    await acme.say("tell me everything")
    events = await acme.respond()
    done = events[-1]["response"]
    # The tenant's max_output_tokens (6) caps every response.
    assert done["status"] == "incomplete"
    assert done["status_details"]["reason"] == "max_output_tokens"
    assert len(reply_text(events).split()) == 6


async def test_a_model_the_tenant_may_not_use_is_refused(stack: Stack) -> None:
    with pytest.raises(websockets.InvalidStatus) as denied:
        await open_client(stack, GLOBEX_KEY, "gpt-realtime")
    assert denied.value.response.status_code == 403
    assert json.loads(denied.value.response.body)["error"]["code"] == "model_not_allowed"


async def test_switching_to_a_forbidden_model_is_an_error(globex: RealtimeClient) -> None:
    await globex.send(
        {"type": "session.update", "session": {"type": "realtime", "model": "gpt-realtime"}}
    )
    error = await globex.recv()
    assert error["error"]["code"] == "model_not_allowed"
    await globex.say("still here")
    assert (await globex.respond())[-1]["response"]["status"] == "completed"


async def test_tools_follow_the_tenant(acme: RealtimeClient, globex: RealtimeClient) -> None:
    directive = (
        '[[sim {"tool_calls": [{"name": "calculate", "arguments": {"expression": "2+2"}}]}]]'
    )
    outcomes: dict[str, Any] = {}
    for name, client in (("acme", acme), ("globex", globex)):
        await client.say(f"add {directive}")
        await client.send({"type": "response.create"})
        events = await client.recv_until("response.done", timeout_s=30)
        events += await client.recv_until("response.done", timeout_s=30)
        outcomes[name] = next(
            json.loads(e["item"]["output"])
            for e in events
            if e["type"] == "conversation.item.added"
            and e["item"]["type"] == "function_call_output"
        )
    assert outcomes["acme"] == {"result": 4}
    assert outcomes["globex"]["error"]["code"] == "tool_not_allowed"


async def test_a_tenant_cannot_reach_another_tenants_items(
    acme: RealtimeClient, globex: RealtimeClient
) -> None:
    added = await acme.say("acme's secret plan")
    item_id = added["item"]["id"]
    for event_type in ("conversation.item.retrieve", "conversation.item.delete"):
        await globex.send({"type": event_type, "item_id": item_id})
        assert (await globex.recv())["error"]["code"] == "item_not_found"
    # Still there for its owner.
    await acme.send({"type": "conversation.item.retrieve", "item_id": item_id})
    assert (await acme.recv())["item"]["content"][0]["text"] == "acme's secret plan"


async def test_a_client_secret_for_a_forbidden_model_is_not_minted(stack: Stack) -> None:
    client = AsyncOpenAI(api_key=GLOBEX_KEY, base_url=f"{stack.gateway_url}/v1")
    with pytest.raises(PermissionDeniedError) as denied:
        await client.realtime.client_secrets.create(
            session={"type": "realtime", "model": "gpt-realtime"}
        )
    assert denied.value.code == "model_not_allowed"
    await client.close()


def test_the_example_tenants_file_is_valid() -> None:
    from switchboard.tenancy import TenantDirectory

    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "tenants.yaml"
    directory = TenantDirectory.load(example, require_env=False)
    assert len(directory) >= 1


async def refused_status(stack: Stack, credential: str) -> int:
    """The status a handshake with `credential` is refused with, once it is refused."""
    for _ in range(50):  # the gateway looks at the tenants file once a second
        try:
            client = await open_client(stack, credential, "gpt-realtime")
        except websockets.InvalidStatus as refused:
            return refused.response.status_code
        await client.connection.close()
        await asyncio.sleep(0.1)
    raise AssertionError("still let in after 5 s")


async def test_a_revoked_tenant_is_refused_after_the_file_changes(stack: Stack) -> None:
    client = AsyncOpenAI(api_key=GONE_KEY, base_url=f"{stack.gateway_url}/v1")
    secret = await client.realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime"}
    )
    await client.close()
    gone = await open_client(stack, GONE_KEY, "gpt-realtime")
    await gone.connection.close()

    path = Path(stack.extra_env["SWITCHBOARD_TENANTS_FILE"])
    path.write_text(tenants_document(stack.ports.simulator, with_gone=False))
    for credential in (GONE_KEY, secret.value):
        assert await refused_status(stack, credential) == 401
    # The others are untouched by the reload.
    await (await open_client(stack, ACME_KEY, "gpt-realtime")).connection.close()
