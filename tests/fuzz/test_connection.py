"""The connection pump under hostile frames, in-process: `MemorySocket`,
`MemoryBackends`, the tenant limits in a real Redis.

After each batch of hostile frames a sentinel event must be answered (no
frame hangs the pump), every frame must have been answered, the connection
stays usable (or closes with a documented code), and nothing the client sent
makes the gateway log an error or a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import orjson
import pytest

from switchboard import errors
from switchboard.config import GatewaySettings
from switchboard.gateway.connection import RealtimeConnection
from switchboard.gateway.eventlog import EventRecorder
from switchboard.gateway.leases import LeaseRenewals
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.testing import MemoryBackends, MemorySocket
from switchboard.limits import TenantLimiter
from switchboard.redis_client import any_client
from switchboard.tenancy import Tenant
from switchboard.v1 import session_pb2
from tests.fuzz.conftest import SEED, figures
from tests.fuzz.test_protocol import CLIENT_ERRORS
from tools.fuzz.hostile import Hostile
from tools.redis_server import RedisServer

CONNECTIONS = 12
FRAMES_PER_CONNECTION = 60
# Frames a server event answers, by the event type that answers them.
ACKS = {
    "session.updated",
    "conversation.item.deleted",
    "conversation.item.retrieved",
    "response.created",
}


def answers(sent: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """How many client frames the events answer, and the error codes among them."""
    response_items = {e["item"]["id"] for e in sent if e["type"] == "response.output_item.added"}
    count, codes = 0, []
    for event in sent:
        if event["type"] == "error":
            codes.append(event["error"]["code"])
            count += 1
        elif event["type"] in ACKS:
            count += 1
        elif event["type"] == "conversation.item.added":
            count += event["item"]["id"] not in response_items
    return count, codes


async def test_hostile_frames_against_the_connection(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    counts = figures("connection")
    redis = any_client(redis_server.url, cluster=False)
    settings = GatewaySettings.from_environ({"SWITCHBOARD_GATEWAY_SESSION_LEASE_S": "5"})
    caplog.set_level(logging.INFO)
    try:
        for number in range(CONNECTIONS):
            seed = SEED + 10_000 + number
            where = f"seed {seed} (SWITCHBOARD_FUZZ_SEED={SEED})"
            hostile = Hostile(random.Random(seed))
            backends = MemoryBackends()
            tenant = Tenant(f"fuzz-{seed}")
            config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
            session = await backends.create_session(tenant.id, config)
            protocol = RealtimeProtocol(
                session_id=session.id, config=config, max_event_bytes=settings.max_event_bytes
            )
            protocol.open()
            socket = MemorySocket()
            recorder = EventRecorder(backends)
            connection = RealtimeConnection(
                socket,
                protocol,
                backends,
                tenant,
                TenantGate(TenantLimiter(redis), reserve_output_tokens=100),
                GatewayMetrics(),
                recorder,
                LeaseRenewals(backends, settings.session_lease_s),
                settings,
                holder=f"conn_fuzz_{number}",
            )
            task = asyncio.create_task(connection.run())
            frames = [hostile.frame() for _ in range(FRAMES_PER_CONNECTION)]
            cancels = 0
            for frame in frames:
                if frame.kind == "text":
                    socket.send_raw(text=str(frame.data))
                    cancels += '"response.cancel"' in str(frame.data)
                else:
                    socket.send_raw(data=bytes(frame.data))
            socket.send({"type": "conversation.item.retrieve", "item_id": "no", "event_id": "end"})
            async with asyncio.timeout(30):
                while not any(
                    e["type"] == "error" and e["error"]["event_id"] == "end" for e in socket.sent
                ):
                    assert not task.done(), f"{where}: the connection ended"
                    if socket.closed is not None:
                        break
                    await asyncio.sleep(0.005)
            sent = socket.sent
            for event in sent:
                orjson.dumps(event)
            answered, codes = answers(sent)
            # A session.update to a model the tenant may not use is refused (docs/protocol.md).
            documented = CLIENT_ERRORS | {"model_not_allowed", "rate_limit_exceeded"}
            assert set(codes) <= documented, f"{where}: {set(codes) - documented}"
            if socket.closed is None:
                # Every frame answered, counting a cancel answered by its response.
                assert answered + cancels >= len(frames) + 1, f"{where}: {answered} answers"
            else:
                code, _ = socket.closed
                assert errors.close_is_terminal(code) or code in (4008, 1011), where
                counts[f"close:{code}"] += 1
            socket.leave()
            await asyncio.wait_for(task, 30)
            await recorder.close()
            counts["frames"] += len(frames)
            counts.update(f"error:{code}" for code in codes)
    finally:
        await redis.aclose()
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
