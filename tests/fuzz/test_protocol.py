"""The protocol core under hostile frames, in-process: seeded, bounded, fast.

Thousands of frames from `tools.fuzz.hostile` go to a `RealtimeProtocol` driven
the way the connection drives it (each command's report follows, responses
stream and end, some are still running when the next frame comes). Every
frame must be answered with commands or with an `error` of a documented client
code, nothing may raise, and every event queued must be writable as JSON (the
crash of issue 17: JSON the reader takes but the writer cannot echo).
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from switchboard import errors
from switchboard.errors import ItemNotFound
from switchboard.gateway.commands import (
    CancelResponse,
    Command,
    DeleteItem,
    RetrieveItem,
    StartResponse,
    StoreItem,
    UpdateSession,
)
from switchboard.gateway.protocol import RealtimeProtocol, State
from switchboard.v1 import common_pb2, session_pb2
from tests.fuzz.conftest import SEED, figures
from tools.fuzz.hostile import Hostile

SESSIONS = 60
FRAMES_PER_SESSION = 80
# What a client's frame may be answered with, alone (docs/errors.md).
CLIENT_ERRORS = {
    "invalid_json",
    "binary_frame_unsupported",
    "frame_too_large",
    "unknown_event_type",
    "missing_required_parameter",
    "invalid_value",
    "unknown_parameter",
    "unsupported_feature",
    "value_too_large",
    "json_too_deep",
    "field_locked",
    "conversation_already_has_active_response",
    "response_cancel_not_active",
    "item_not_found",
}
# An error event carries at most a bounded message and param.
MAX_ERROR_EVENT_BYTES = 4096


class Driver:
    """Carries out the protocol's commands as the connection would, in memory."""

    def __init__(self, protocol: RealtimeProtocol, rng: random.Random) -> None:
        self.protocol = protocol
        self.rng = rng
        self.running: StartResponse | None = None
        self.cancelled = False

    def carry_out(self, command: Command) -> None:
        p = self.protocol
        match command:
            case UpdateSession():
                p.session_updated(command)
            case StoreItem():
                p.item_added(command.item, command.previous_item_id)
            case DeleteItem():
                p.item_deleted(command.item_id)
            case RetrieveItem():
                p.fail(ItemNotFound("no such item", param="item_id"), command.client_event_id)
            case StartResponse():
                self.running, self.cancelled = command, False
                p.text_delta(command.response_id, "Hi")
                if self.rng.random() < 0.5:  # ends before the next frame
                    self.finish()
            case CancelResponse():
                self.cancelled = True

    def finish(self) -> None:
        if self.running is None:
            return
        response_id = self.running.response_id
        self.protocol.call_delta(response_id, 0, "call_1", "lookup", '{"q": 1}')
        status = "cancelled" if self.cancelled else "completed"
        self.protocol.complete_output(response_id, complete=status == "completed")
        self.protocol.response_done(
            response_id,
            status=status,
            usage=common_pb2.Usage(),
            reason="client_cancelled" if self.cancelled else None,
        )
        self.running = None


def check_events(events: list[dict[str, Any]], where: str) -> list[str]:
    """Every event is writable; error events are small and documented. Returns
    the error codes."""
    codes = []
    for event in events:
        data = orjson.dumps(event)  # raises on what the writer cannot write
        if event["type"] == "error":
            code = event["error"]["code"]
            assert code in CLIENT_ERRORS, f"{where}: undocumented {code}"
            assert errors.code_from_name(code) is not None, where
            assert len(data) <= MAX_ERROR_EVENT_BYTES, f"{where}: error of {len(data)} bytes"
            codes.append(code)
    return codes


def test_hostile_frames_get_commands_or_documented_errors() -> None:
    counts = figures("protocol")
    for number in range(SESSIONS):
        seed = SEED + number
        rng = random.Random(seed)
        hostile = Hostile(rng)
        config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
        locked = frozenset({"model"}) if rng.random() < 0.2 else frozenset()
        protocol = RealtimeProtocol(
            session_id="sess_fuzz", config=config, max_event_bytes=256 * 1024, locked=locked
        )
        protocol.open()
        protocol.take_events()
        driver = Driver(protocol, rng)
        event_ids: set[str] = set()
        for index in range(FRAMES_PER_SESSION):
            frame = hostile.frame()
            where = f"seed {seed} (SWITCHBOARD_FUZZ_SEED={SEED}), frame {index}: {frame.label()}"
            if frame.kind == "text":
                assert isinstance(frame.data, str)
                commands = protocol.receive_text(frame.data)
            else:
                # A real socket closes on invalid UTF-8 (transport.py); in-process
                # it stands for one more binary frame.
                assert isinstance(frame.data, bytes)
                commands = protocol.receive_bytes(frame.data)
            for command in commands:
                driver.carry_out(command)
            events = protocol.take_events()
            codes = check_events(events, where)
            assert commands or codes, f"{where}: no answer"
            if codes and not commands:
                assert len(codes) == 1, f"{where}: {codes}"
            for event in events:
                assert event["event_id"] not in event_ids, where
                event_ids.add(event["event_id"])
            counts["frames"] += 1
            counts.update(f"error:{code}" for code in codes)
            counts.update(f"command:{type(c).__name__}" for c in commands)
            if driver.running is not None and rng.random() < 0.5:
                driver.finish()
                check_events(protocol.take_events(), where)
        driver.finish()
        check_events(protocol.take_events(), f"seed {seed}: end")
        assert protocol.state is State.IDLE
