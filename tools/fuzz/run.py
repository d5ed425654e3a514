"""The real-process fuzz: hostile frames, handshakes and HTTP requests against a
running stack (`make fuzz`; a short run is tests/e2e/test_fuzz.py).

Every frame must be answered (an `error` with a documented code, the event's
own answer, or a documented close), every handshake and request must get a
documented status without hanging, no service may log a traceback or an
error-level line, and every service must be alive and ready afterwards.
"""

from __future__ import annotations

import asyncio
import io
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import websockets

from tools.fuzz.hostile import Frame, Hostile
from tools.stack import Stack

ROOT = Path(__file__).resolve().parent.parent.parent
# How long a frame, a handshake or a request may go unanswered before it counts as a hang.
ANSWER_TIMEOUT_S = 60.0
# Statuses a hostile handshake may get (docs/protocol.md, docs/input-limits.md;
# 426 is the WebSocket library's answer to an unsupported version).
HANDSHAKE_STATUSES = {101, 400, 401, 403, 404, 408, 410, 414, 426, 431, 503}
HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 408, 413, 414, 431}
# Server events that answer one client frame each.
ACKS = {
    "session.updated",
    "conversation.item.deleted",
    "conversation.item.retrieved",
    "response.created",
}


def documented_codes() -> tuple[set[str], set[int]]:
    """Error codes and close codes docs/errors.md lists."""
    text = (ROOT / "docs" / "errors.md").read_text()
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))
    closes = {int(code) for code in re.findall(r"^\| (\d{4}) \|", text, re.MULTILINE)}
    return codes, closes


@dataclass
class Report:
    seed: int
    frames: int = 0
    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    # Responses by their status (and code, when failed).
    responses: Counter[str] = field(default_factory=Counter)
    handshakes: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    hangs: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    undocumented: list[str] = field(default_factory=list)
    tracebacks: Counter[str] = field(default_factory=Counter)
    # Error-level lines (and lines that are not our JSON): none may come from input.
    loud_lines: Counter[str] = field(default_factory=Counter)
    # Warnings: expected ones (a response the upstream refused), counted.
    warnings: Counter[str] = field(default_factory=Counter)
    unhealthy: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.hangs
            or self.unanswered
            or self.undocumented
            or self.tracebacks
            or self.loud_lines
            or self.unhealthy
        )

    def summary(self) -> str:
        def counts(counter: Counter[Any]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=str)) or "none"

        return "\n".join(
            [
                f"fuzz seed {self.seed} (repeat with --seed {self.seed})",
                f"  frames: {self.frames} over {self.connections} connections",
                f"  errors by code: {counts(self.errors)}",
                f"  closes by code: {counts(self.closes)}",
                f"  responses by status: {counts(self.responses)}",
                f"  handshakes by label and status: {counts(self.handshakes)}",
                f"  HTTP requests by label and status: {counts(self.requests)}",
                f"  hangs: {len(self.hangs)} {self.hangs[:5]}",
                f"  unanswered: {len(self.unanswered)} {self.unanswered[:5]}",
                f"  undocumented answers: {len(self.undocumented)} {self.undocumented[:5]}",
                f"  tracebacks: {sum(self.tracebacks.values())} {dict(self.tracebacks)}",
                f"  error lines: {sum(self.loud_lines.values())} {dict(self.loud_lines)}",
                f"  warning lines: {sum(self.warnings.values())} {dict(self.warnings)}",
                f"  unhealthy: {self.unhealthy or 'none'}",
            ]
        )


class Fuzzer:
    def __init__(self, stack: Stack, seed: int) -> None:
        self.stack = stack
        self.report = Report(seed)
        self.codes, self.close_codes = documented_codes()

    # --- frames ----------------------------------------------------------------------

    async def connection(self, hostile: Hostile, frames: int, where: str) -> None:
        report = self.report
        async with websockets.connect(
            f"{self.stack.websocket_url}?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {self.stack.dev_key}"},
            max_size=None,
            open_timeout=ANSWER_TIMEOUT_S,
        ) as connection:
            report.connections += 1
            sent: list[Frame] = [hostile.frame() for _ in range(frames)]
            events: list[dict[str, Any]] = []
            closed: int | None = None
            try:
                for frame in sent:
                    # A bad_utf8 payload goes out as a text frame, as it is.
                    await connection.send(frame.data, text=frame.kind != "bytes")
                    report.frames += 1
                end = {"type": "conversation.item.retrieve", "item_id": "none", "event_id": "end"}
                await connection.send(orjson.dumps(end).decode())
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    while True:
                        event = orjson.loads(await connection.recv())
                        events.append(event)
                        if event["type"] == "error" and event["error"]["event_id"] == "end":
                            break
            except (websockets.ConnectionClosed, AttributeError):
                # (websockets 16 may raise AttributeError when it sends on a
                # connection the server has just failed and half-closed.)
                rcvd = connection.protocol.close_rcvd
                closed = rcvd.code if rcvd is not None else 1006
            except TimeoutError:
                report.hangs.append(f"{where}: no answer to the last frame")
                return
        self._check_answers(sent, events, closed, where)

    def _check_answers(
        self, sent: list[Frame], events: list[dict[str, Any]], closed: int | None, where: str
    ) -> None:
        report = self.report
        response_items = {
            e["item"]["id"] for e in events if e["type"] == "response.output_item.added"
        }
        answered = 0
        for event in events:
            if event["type"] == "error":
                code = event["error"]["code"]
                report.errors[code] += 1
                answered += 1
                if code not in self.codes:
                    report.undocumented.append(f"{where}: error {code}")
            elif event["type"] in ACKS:
                answered += 1
            elif event["type"] == "response.done":
                body = event["response"]
                details = body.get("status_details") or {}
                code = (details.get("error") or {}).get("code")
                report.responses[body["status"] + (f" {code}" if code else "")] += 1
            elif event["type"] == "conversation.item.added":
                answered += event["item"]["id"] not in response_items
        if closed is not None:
            report.closes[closed] += 1
            if closed not in self.close_codes:
                report.undocumented.append(f"{where}: close {closed}")
            return
        # A cancel is answered by an error or by the response it ends.
        cancels = sum('"response.cancel"' in str(f.data) for f in sent if f.kind == "text")
        if answered + cancels < len(sent) + 1:
            report.unanswered.append(f"{where}: {answered + cancels} answers to {len(sent)}")

    # --- handshakes and requests -------------------------------------------------------

    async def handshake(self, hostile: Hostile, where: str) -> None:
        label, data = hostile.handshake(self.stack.dev_key)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.stack.ports.gateway)
        try:
            writer.write(data)
            await writer.drain()
            head = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT_S)
        except TimeoutError:
            self.report.hangs.append(f"{where}: handshake {label}")
            return
        except ConnectionError:
            head = b""
        finally:
            writer.close()
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.report.handshakes[f"{label} {status}"] += 1
        if status not in HANDSHAKE_STATUSES:
            self.report.undocumented.append(f"{where}: handshake {label} got {head[:60]!r}")

    async def request(self, http: aiohttp.ClientSession, hostile: Hostile, where: str) -> None:
        label, method, path, headers, body = hostile.http_request(self.stack.dev_key)
        try:
            async with (
                asyncio.timeout(ANSWER_TIMEOUT_S),
                http.request(
                    method, self.stack.gateway_url + path, headers=headers, data=io.BytesIO(body)
                ) as reply,
            ):
                status = reply.status
                payload = await reply.read()
        except TimeoutError:
            self.report.hangs.append(f"{where}: {label} {method} {path[:40]}")
            return
        self.report.requests[f"{label} {status}"] += 1
        if status not in HTTP_STATUSES:
            self.report.undocumented.append(f"{where}: {label} got {status}")
        if status >= 400 and path == "/v1/realtime/client_secrets":
            code = orjson.loads(payload)["error"]["code"]
            if code not in self.codes:
                self.report.undocumented.append(f"{where}: {label} error {code}")

    # --- logs and health ---------------------------------------------------------------

    def log_offsets(self) -> dict[Path, int]:
        return {path: path.stat().st_size for path in self.stack.log_dir.glob("*.log")}

    def scan_logs(self, since: dict[Path, int]) -> None:
        for path in sorted(self.stack.log_dir.glob("*.log")):
            with path.open("rb") as log:
                log.seek(since.get(path, 0))
                for raw in log.read().splitlines():
                    if b"Traceback" in raw or b'"exc":' in raw:
                        self.report.tracebacks[path.name] += 1
                    try:
                        line = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        self.report.loud_lines[f"{path.name}: not JSON"] += 1
                        continue
                    if line.get("level") == "warning":
                        self.report.warnings[f"{path.name}: {line.get('msg')}"] += 1
                    elif line.get("level") not in ("info", "debug"):
                        self.report.loud_lines[f"{path.name}: {line.get('msg')}"] += 1

    async def check_health(self) -> None:
        for name, service in self.stack.services.items():
            if not service.alive():
                self.report.unhealthy.append(f"{name} exited")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.stack.gateway_url}/readyz") as reply,
        ):
            if reply.status != 200:
                self.report.unhealthy.append(f"/readyz {reply.status}")
        # A plain conversation still works.
        async with websockets.connect(
            f"{self.stack.websocket_url}?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {self.stack.dev_key}"},
        ) as connection:
            await connection.recv()
            hello = {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello"}],
                },
            }
            await connection.send(orjson.dumps(hello).decode())
            await connection.send(orjson.dumps({"type": "response.create"}).decode())
            async with asyncio.timeout(30):
                while (event := orjson.loads(await connection.recv()))["type"] != "response.done":
                    pass
            if event["response"]["status"] != "completed":
                details = event["response"]["status_details"]
                self.report.unhealthy.append(f"a plain response ended {details}")


async def fuzz(
    stack: Stack,
    seed: int,
    *,
    connections: int,
    frames: int,
    handshakes: int,
    requests: int,
    concurrency: int = 8,
) -> Report:
    """Run the fuzz against a started stack; the report says what it found."""
    fuzzer = Fuzzer(stack, seed)
    offsets = fuzzer.log_offsets()
    limit = asyncio.Semaphore(concurrency)

    async def bounded(work: Any) -> None:
        async with limit:
            await work

    jobs = []
    for number in range(connections):
        hostile = Hostile(random.Random(f"{seed}:connection:{number}"))
        jobs.append(fuzzer.connection(hostile, frames, f"connection {number}"))
    for number in range(handshakes):
        hostile = Hostile(random.Random(f"{seed}:handshake:{number}"))
        jobs.append(fuzzer.handshake(hostile, f"handshake {number}"))
    async with aiohttp.ClientSession() as http:
        for number in range(requests):
            hostile = Hostile(random.Random(f"{seed}:request:{number}"))
            jobs.append(fuzzer.request(http, hostile, f"request {number}"))
        random.Random(seed).shuffle(jobs)
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(bounded(job))
    await fuzzer.check_health()
    await asyncio.sleep(0.5)  # the last log lines
    fuzzer.scan_logs(offsets)
    return fuzzer.report
