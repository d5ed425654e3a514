"""Hostile handshakes and frames against the real gateway process: every one is
answered with the status or close code docs/input-limits.md gives, nothing hangs,
and the gateway's log gets rate-limited info lines, never an error or a traceback."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import websockets

from tests.e2e.conftest import connect
from tools.stack import Stack

# The stack's handshake timeout (tests/e2e/conftest.py sets it low).
HANDSHAKE_TIMEOUT_S = 2.0


def upgrade_head(target: str, *headers: str, key: str = "") -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {nonce}",
        "Sec-WebSocket-Version: 13",
        *([f"Authorization: Bearer {key}"] if key else []),
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def exchange(stack: Stack, data: bytes, *, wait_s: float = 10.0) -> bytes:
    """Send raw bytes to the gateway; everything it answers until it closes.
    Fails (TimeoutError) if it neither answers nor closes within `wait_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.ports.gateway)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer.split(b" ", 2)[1])


@contextmanager
def gateway_log(stack: Stack) -> Iterator[list[dict[str, object]]]:
    """The gateway's log lines written inside the block (parsed), after it."""
    path: Path = stack.services["gateway"].log_path
    start = path.stat().st_size
    lines: list[dict[str, object]] = []
    yield lines
    with path.open("rb") as log:
        log.seek(start)
        for raw in log.read().splitlines():
            try:
                lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                lines.append({"level": "raw", "msg": raw.decode(errors="replace")})


def loud(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    """Lines that must not come from client input: warnings and up, tracebacks,
    anything not our JSON."""
    return [
        line
        for line in lines
        if line.get("level") not in ("info", "debug") or "exc" in line or "Traceback" in str(line)
    ]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (lambda key: upgrade_head("/v1/realtime?model=" + "m" * 10_000, key=key), 414),
        (lambda key: upgrade_head("/v1/realtime", key="k" * 60_000), 431),
        (lambda key: upgrade_head("/v1/realtime", "X-Big: " + "b" * 9_000, key=key), 431),
        (
            lambda key: upgrade_head("/v1/realtime", *(f"X-H{i}: v" for i in range(150)), key=key),
            431,
        ),
        (
            lambda key: upgrade_head(
                "/v1/realtime", *(f"X-H{i}: " + "v" * 4000 for i in range(9)), key=key
            ),
            431,
        ),
        # httptools takes this header value; the websockets parser does not.
        (lambda key: upgrade_head("/v1/realtime", "X-Odd: a\x7fb", key=key), 400),
        (lambda key: b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
        (lambda key: b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
    ],
    ids=[
        "long-query",
        "60k-bearer",
        "9k-header",
        "150-headers",
        "36k-headers",
        "odd-header",
        "http-70k",
        "tls-hello",
    ],
)
async def test_an_oversized_or_malformed_head_is_answered_at_once(
    stack: Stack, head: object, expected: int
) -> None:
    with gateway_log(stack) as lines:
        answer = await exchange(stack, head(stack.dev_key))  # type: ignore[operator]
        assert status(answer) == expected
    assert not loud(lines), lines


async def test_a_slow_handshake_is_cut_after_the_handshake_timeout(stack: Stack) -> None:
    started = asyncio.get_running_loop().time()
    partial = upgrade_head("/v1/realtime", key=stack.dev_key)[:40]  # never finishes
    answer = await exchange(stack, partial, wait_s=HANDSHAKE_TIMEOUT_S * 5)
    assert status(answer) == 408
    assert asyncio.get_running_loop().time() - started >= HANDSHAKE_TIMEOUT_S * 0.9
    # A connection that sends nothing at all is cut too.
    assert status(await exchange(stack, b"", wait_s=HANDSHAKE_TIMEOUT_S * 5)) == 408


async def test_invalid_utf8_closes_with_1007_without_a_traceback(stack: Stack) -> None:
    with gateway_log(stack) as lines:
        for _ in range(20):
            async with connect(stack) as connection:
                await connection.recv()  # session.created
                # A text frame whose payload is not UTF-8 (the client library
                # sends bytes as given with the text opcode).
                await connection.send(b"\xff\xfe{}", text=True)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(connection.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
        await asyncio.sleep(0.5)
    assert not loud(lines), lines
    assert any(line.get("reason") == "invalid_utf8" for line in lines)


async def test_refused_handshakes_are_a_few_info_lines(stack: Stack) -> None:
    with gateway_log(stack) as lines:
        for _ in range(60):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(stack, key="sk-sb-wrong-key"):
                    pass
            assert refused.value.response.status_code == 401
        await asyncio.sleep(0.5)
    assert not loud(lines), lines
    refusals = [line for line in lines if line.get("msg") == "handshake refused"]
    assert refusals and all(line["code"] == "invalid_api_key" for line in refusals)
    assert len(refusals) <= 60
    # At most 10 a second: no 1 s span holds more than two windows' worth.
    times = [datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")) for line in refusals]
    for first in times:
        assert sum(0 <= (t - first).total_seconds() < 1.0 for t in times) <= 20
