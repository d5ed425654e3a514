"""Resuming a voice session (docs/voice.md#resume): ids, where the session is
held, and what a resumed connection has already been given.

A voice session is not recorded in the session's event log: the broker that
holds its upstream socket numbers its events and keeps the newest of them
(broker/realtime_held.py). Upstream events reach the client with the id
`event_v<seq in hex>`; an `error` the gateway itself sends gets
`event_v<seq of the upstream event before it>_sbv<n>`. Either, sent back as
`last_event_id`, names the seq after which the client resumes (errors the
gateway sent are not replayed).

The gateway notes in the session store which broker holds the session (the
text path's note of the broker running a response, under the response id
`VOICE_CALL`), so a resume on any gateway attaches at that broker.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import grpc

from switchboard import rpc
from switchboard.errors import SwitchboardError, invalid_value
from switchboard.gateway.eventlog import EventRecorder
from switchboard.gateway.voice_mux import VoiceMux
from switchboard.v1 import common_pb2, realtime_pb2, realtime_pb2_grpc, session_pb2

log = logging.getLogger(__name__)

# The "response" under which the session store notes a voice session's broker.
VOICE_CALL = "voice_session"
# Channels kept to brokers by address; the oldest is closed past this many.
MAX_BROKER_CHANNELS = 32
# How long a gateway waits for the broker to close the upstream after its
# client closed the session.
CLOSE_WAIT_S = 2.0
CLOSE = realtime_pb2.RealtimeRequest(close=realtime_pb2.RealtimeClose())

_EVENT_ID = re.compile(r"event_v([0-9a-f]{1,15})(?:_sbv[0-9]{1,18})?")
_LOCAL_ID = '"event_id":"event_sbv'


def after_seq(last_event_id: str) -> int:
    """The seq a voice session's client resumes after ("" : from the start).

    Raises:
        InvalidRequest: `invalid_value` for an id that is not a voice event id.
    """
    if not last_event_id:
        return 0
    match = _EVENT_ID.fullmatch(last_event_id)
    if match is None:
        raise invalid_value("last_event_id", "'last_event_id' is not an event id of this session.")
    return int(match.group(1), 16)


def closes_upstream(end_reason: str, client_close_code: int | None) -> bool:
    """Whether a connection's end closes its upstream session (else the broker
    holds it for a resume): the client closed its socket with 1000."""
    return end_reason == "client_closed" and client_close_code == 1000


class ResumeState:
    """What a voice connection knows of the session's numbering."""

    def __init__(self) -> None:
        self.resumed = False
        # The newest seq the session's earlier connections were given by the
        # broker: they admitted and settled the responses up to it.
        self.delivered_seq = 0
        # The seq of the newest upstream event this connection has handled.
        self.last_seq = 0

    def attached(self, attached: realtime_pb2.RealtimeAttached, after_seq: int) -> None:
        self.resumed = True
        self.delivered_seq = attached.delivered_seq
        self.last_seq = after_seq

    def seen(self, event: dict[str, Any]) -> bool:
        """Note an upstream event; True when an earlier connection was given it."""
        event_id = event.get("event_id")
        match = _EVENT_ID.fullmatch(event_id) if isinstance(event_id, str) else None
        if match is None:
            return False
        self.last_seq = int(match.group(1), 16)
        return self.last_seq <= self.delivered_seq

    def local_ids(self, text: str) -> str:
        """`text` with the id of an event the gateway made (an `error`, an MCP
        event: `event_sbv<n>`, its first field after `type`) placed after the last seq."""
        at = text.find(_LOCAL_ID, 0, 96)
        if at >= 0 and text.find('"event_id":"', 0, at) < 0:
            return text.replace("event_sbv", f"event_v{self.last_seq:x}_sbv", 1)
        return text


def audio_lost_error() -> SwitchboardError:
    """What a resumed client is told when the response audio it missed was not kept."""
    return SwitchboardError(
        "Some output audio sent while you were away was not kept for the resume; "
        "the events that follow skip it (transcripts and items are whole).",
        code=common_pb2.ERROR_CODE_RESUME_AUDIO_LOST,
    )


class VoiceBrokers:
    """The gateway's voice sessions at the brokers, each broker's over one call
    (`VoiceMux`): the configured broker target's, and those of the brokers
    holding resumed sessions, by the address they named themselves by."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = rpc.channel(target)
        self.stub = realtime_pb2_grpc.RealtimeServiceStub(self.channel)
        self.sessions = VoiceMux(self.stub, target)
        self._by_address: dict[str, tuple[grpc.aio.Channel, VoiceMux]] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def at(self, address: str) -> VoiceMux:
        """The sessions at the broker at `address` ("": the configured target)."""
        if not address or address == self.target:
            return self.sessions
        known = self._by_address.pop(address, None)
        if known is None:
            if len(self._by_address) >= MAX_BROKER_CHANNELS:
                oldest = next(iter(self._by_address))
                closing = asyncio.ensure_future(_close(*self._by_address.pop(oldest)))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            channel = rpc.channel(address)
            known = (channel, VoiceMux(realtime_pb2_grpc.RealtimeServiceStub(channel), address))
        self._by_address[address] = known  # the newest last
        return known[1]

    async def close(self) -> None:
        await _close(self.channel, self.sessions)
        for channel, sessions in self._by_address.values():
            await _close(channel, sessions)


async def _close(channel: grpc.aio.Channel, sessions: VoiceMux) -> None:
    await sessions.close()
    await channel.close()


async def note_broker(
    recorder: EventRecorder, tenant_id: str, session_id: str, broker: str
) -> None:
    """Note in the session the broker holding its voice session (from `opened`)."""
    if not broker:
        return
    try:
        await recorder.append(
            session_pb2.AppendEventsRequest(
                tenant_id=tenant_id,
                session_id=session_id,
                open_response_id=VOICE_CALL,
                broker_response_id=VOICE_CALL,
                broker_address=broker,
            )
        )
    except SwitchboardError as exc:
        # A resume then tries the configured broker target.
        log.info(
            "voice broker not noted",
            extra={"tenant_id": tenant_id, "session_id": session_id, "code": exc.name},
        )


def held_at(session: session_pb2.Session) -> str:
    """The broker the session store says holds a voice session ("": unknown)."""
    return session.open_response_broker if session.open_response_id == VOICE_CALL else ""
