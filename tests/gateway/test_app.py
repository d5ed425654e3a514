"""The whole gateway app in-process: uvicorn on 127.0.0.1:0, a real WebSocket
client, real Redis for limits and secrets, the in-memory backends for the rest.
Handshake refusals, a conversation, a resume, client secrets, readiness."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection

from switchboard.config import GatewaySettings
from switchboard.gateway.app import create_app
from switchboard.gateway.testing import MemoryBackends, reply
from switchboard.gateway.transport import protocols
from switchboard.tenancy import load_tenants
from tools.redis_server import RedisServer

KEY = "sk-sb-apptest-0123456789abcdef"


@dataclass
class Gateway:
    url: str
    backends: MemoryBackends
    app: Any = None

    def ws(self, query: str = "model=gpt-realtime", key: str = KEY, **kwargs: Any) -> Any:
        return websockets.connect(
            f"ws://{self.url}/v1/realtime?{query}",
            additional_headers={"Authorization": f"Bearer {key}"},
            **kwargs,
        )


async def recv(connection: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(await asyncio.wait_for(connection.recv(), 5))
    return event


async def recv_until(connection: ClientConnection, event_type: str) -> list[dict[str, Any]]:
    events = []
    while True:
        events.append(await recv(connection))
        if events[-1]["type"] == event_type:
            return events


@pytest.fixture
async def gateway(redis_server: RedisServer) -> AsyncIterator[Gateway]:
    # No load shedding, as for the suite's other gateways (tests/conftest.py).
    settings = GatewaySettings.from_environ(
        {"SWITCHBOARD_REDIS_URL": redis_server.url, "SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS": "0"}
    )
    tenants = load_tenants(
        {"SWITCHBOARD_TENANT_KEYS": f"apptest={hashlib.sha256(KEY.encode()).hexdigest()}"}
    )
    backends = MemoryBackends()
    app = create_app(settings, tenants, backends=backends)
    http, ws = protocols(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=http, ws=ws, log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Gateway(f"127.0.0.1:{port}", backends, app)
    server.should_exit = True
    await task


async def test_a_bad_key_is_refused_at_the_handshake(gateway: Gateway) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with gateway.ws(key="sk-sb-wrong"):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert orjson.loads(response.body)["error"]["code"] == "invalid_api_key"


async def test_a_conversation_and_its_resume(gateway: Gateway) -> None:
    gateway.backends.model.queue(reply("Hello", " from", " memory."))
    async with gateway.ws() as connection:
        created = await recv(connection)
        assert created["type"] == "session.created"
        session_id = created["session"]["id"]
        await connection.send(orjson.dumps({"type": "response.create"}).decode())
        events = await recv_until(connection, "response.done")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello from memory."
    # Resume after the first delta: the rest of the response, exactly as sent.
    first_delta = next(e for e in events if e["type"] == "response.output_text.delta")
    query = f"model=gpt-realtime&session_id={session_id}&last_event_id={first_delta['event_id']}"
    async with gateway.ws(query) as connection:
        replayed = await recv_until(connection, "response.done")
    after = events[events.index(first_delta) + 1 :]
    assert replayed == after


async def test_a_resume_of_an_unknown_session_is_refused_with_404(gateway: Gateway) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with gateway.ws("model=gpt-realtime&session_id=sess_nope"):
            pass
    assert refused.value.response.status_code == 404


async def test_a_client_secret_opens_a_session_of_its_model_only(gateway: Gateway) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(f"http://{gateway.url}") as http:
        body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
        async with http.post("/v1/realtime/client_secrets", headers=auth, json=body) as minted:
            assert minted.status == 200
            secret = (await minted.json())["value"]
        assert secret.startswith("ek_")
        async with http.post("/v1/realtime/client_secrets", headers=auth, data=b"{no") as bad:
            assert (bad.status, (await bad.json())["error"]["code"]) == (400, "invalid_json")
        async with http.get("/readyz") as ready:
            assert await ready.json() == {
                "ready": True,
                "checks": {"session": True, "broker": True, "toolexec": True, "redis": True},
            }
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with gateway.ws("model=other-model", key=secret):
            pass
    assert refused.value.response.status_code == 403
    async with gateway.ws(key=secret) as connection:
        assert (await recv(connection))["type"] == "session.created"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        # The reproducer: 300 levels in an echoed field (was HTTP 500).
        (
            '{"session": {"type": "realtime", "tracing": '
            + '{"a": ' * 300
            + "1"
            + "}" * 300
            + "}}",
            400,
            "json_too_deep",
        ),
        ("[" * 2000 + "]" * 2000, 400, "json_too_deep"),
        (
            orjson.dumps({"session": {"type": "realtime", "instructions": "i" * 3_000_000}}),
            413,
            "frame_too_large",
        ),
        (
            orjson.dumps({"session": {"type": "realtime", "instructions": "i" * 70_000}}),
            400,
            "value_too_large",
        ),
        (
            orjson.dumps({"session": {"type": "realtime", "tools": [{"name": "{x}"}]}}),
            400,
            "invalid_value",
        ),
        ("[]", 400, "invalid_value"),
    ],
    ids=["deep-field", "deep-arrays", "3MB-instructions", "70k-instructions", "tool-name", "array"],
)
async def test_a_hostile_client_secret_request_gets_its_error(
    gateway: Gateway, body: str | bytes, status: int, code: str
) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body.encode() if isinstance(body, str) else body
    async with (
        aiohttp.ClientSession(f"http://{gateway.url}") as http,
        http.post("/v1/realtime/client_secrets", headers=auth, data=io.BytesIO(data)) as answer,
    ):
        assert (answer.status, (await answer.json())["error"]["code"]) == (status, code)
