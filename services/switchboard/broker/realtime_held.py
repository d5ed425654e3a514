"""Voice sessions held past their gRPC call, for a resume (docs/voice.md#resume).

A `HeldSession` owns one upstream Realtime socket (used through `recv`,
`send` and `close` only) and outlives the RealtimeService call that opened
it. Its pump numbers every upstream event (`seq` 1, 2, ...), gives it the id
`event_v<seq in hex>` (so a client's `last_event_id` says exactly where it
is), keeps it in a `ReplayBuffer` bounded in bytes and hands it to the one
caller following the session, if any.

When the caller goes away without an explicit `close` (its gateway died, or
its client's socket dropped), the session is held for `hold_s`: the upstream
goes on (a reply in progress is finished and kept), and a new call may
`attach` after the last seq its client saw: it gets the kept events after it,
then the live rest. Only one caller follows a session: an attach takes over,
and the previous caller ends with `session_taken_over`. A `close` from the
caller (the client closed the socket) or the hold running out closes the
upstream socket.

The buffer gives up output audio first: over its bound it drops the oldest
`response.output_audio.delta` events and keeps every other event (items,
transcripts, `response.done`); a replay across dropped audio is marked
(`audio_lost`). Only when no audio is left to drop are the oldest events
dropped, and a resume from before them is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import orjson

from switchboard.broker.multiplex import failure_of
from switchboard.broker.realtime_upstream import UpstreamClosed
from switchboard.errors import SessionTakenOver, SwitchboardError, UpstreamStreamBroken
from switchboard.v1 import common_pb2, realtime_pb2

log = logging.getLogger(__name__)

# An event id of a voice session: "event_v" and the event's seq in hex.
EVENT_ID_PREFIX = "event_v"
_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"[^"]*"')
# Events up to this size are numbered by parsing them; larger ones, and audio
# deltas of any size, by replacing their id in place: base64 holds no quote,
# and an audio delta nests no object, so the first `"event_id"` key of such an
# event is its own.
_PARSE_BELOW = 4096
_AUDIO_DELTA = b'"response.output_audio.delta"'
# How an audio delta starts (the type first, as OpenAI and the simulator send it).
AUDIO_DELTA_START = b'{"type":"response.output_audio.delta"'
# What a voice session gives its caller: a response, or a batch of upstream
# events as they are (bytes: realtime_mux.py nests them into its message once;
# `as_response` makes the `events` response a `Session` call sends).
Outgoing = realtime_pb2.RealtimeResponse | list[bytes]
# Events waiting for a caller that reads slower than the upstream speaks (a
# stuck gateway); past this it is cut with `slow_consumer` and the session held.
FOLLOWER_MAX_BYTES = 16 * 1024 * 1024


class UpstreamSocket(Protocol):
    """What a held session uses of the upstream socket (realtime_link.py's
    `RealtimeLink`, which rolls the upstream session over, or a stand-in)."""

    async def recv(self, decode: bool = False) -> bytes: ...

    async def send(self, message: bytes | str, text: bool = True) -> None: ...

    async def close(self) -> None: ...


def event_id(seq: int) -> str:
    """The id the client sees on the event numbered `seq`."""
    return f"{EVENT_ID_PREFIX}{seq:x}"


def number_event(event: bytes, seq: int) -> bytes:
    """`event` with its `event_id` made `event_id(seq)` (added when it has none)."""
    new_id = event_id(seq)
    if len(event) < _PARSE_BELOW and not event.startswith(AUDIO_DELTA_START):
        try:
            parsed = orjson.loads(event)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(parsed, dict):
            return event
        parsed["event_id"] = new_id
        return orjson.dumps(parsed)
    pair = b'"event_id":"' + new_id.encode() + b'"'
    match = _EVENT_ID.search(event)
    if match is not None:
        return event[: match.start()] + pair + event[match.end() :]
    start = event.find(b"{")
    return event if start < 0 else event[: start + 1] + pair + b"," + event[start + 1 :]


def resume_refused(message: str) -> SwitchboardError:
    """The refusal of an attach (HTTP 410 `resume_unavailable` at the client's handshake)."""
    return SwitchboardError(
        message, code=common_pb2.ERROR_CODE_RESUME_UNAVAILABLE, param="last_event_id"
    )


@dataclass(slots=True)
class _Kept:
    seq: int
    event: bytes | None  # None: audio dropped to keep within the bound


class ReplayBuffer:
    """The newest events of a session, within `max_bytes` (audio given up first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.last_seq = 0
        # The newest seq of an event (other than audio) no longer kept.
        self.lost_through = 0
        # The newest seq of an audio delta no longer kept.
        self.audio_lost_through = 0
        self._kept: deque[_Kept] = deque()
        self._audio: deque[_Kept] = deque()

    def add(self, seq: int, event: bytes) -> None:
        kept = _Kept(seq, event)
        self._kept.append(kept)
        if _AUDIO_DELTA in event[:256]:
            self._audio.append(kept)
        self.size += len(event)
        self.last_seq = seq
        while self.size > self.max_bytes and self._kept:
            if self._audio:
                dropped = self._audio.popleft()
                self.audio_lost_through = dropped.seq
            else:
                dropped = self._kept.popleft()
                self.lost_through = dropped.seq
            self.size -= len(dropped.event or b"")
            dropped.event = None
            while self._kept and self._kept[0].event is None:
                self._kept.popleft()

    def after(self, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
        """The kept events after `seq`, and whether audio after it was dropped.

        Raises:
            SwitchboardError: `resume_unavailable` for a seq never sent, or one
                whose following events are no longer all kept.
        """
        if seq > self.last_seq or seq < 0:
            raise resume_refused("'last_event_id' names an event this session never sent.")
        if seq < self.lost_through:
            raise resume_refused(
                "The events after 'last_event_id' are no longer kept; start a new session."
            )
        events = [(k.seq, k.event) for k in self._kept if k.seq > seq and k.event is not None]
        return events, seq < self.audio_lost_through


class _Follower:
    """The caller following a held session: events not yet yielded to it, or its end."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []
        self.size = 0  # bytes of `events` pushed since the last batch
        self.failure: SwitchboardError | None = None
        self.ended = False
        self.ready = asyncio.Event()

    def push(self, seq: int, event: bytes) -> None:
        self.events.append((seq, event))
        self.size += len(event)
        self.ready.set()

    def end(self, failure: SwitchboardError | None = None) -> None:
        if not self.ended:
            self.ended, self.failure = True, failure
        self.ready.set()

    async def batches(self) -> AsyncIterator[list[tuple[int, bytes]]]:
        """What arrived since the last batch, until the follower ends (then `failure`)."""
        while True:
            if self.events:
                batch, self.events, self.size = self.events, [], 0
                yield batch
                continue
            if self.ended:
                return
            self.ready.clear()
            await self.ready.wait()


@dataclass
class SessionEnds:
    """What the one log line of a session says."""

    ids: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    upstream: str = ""
    upstream_model: str = ""
    events_in: int = 0
    events_out: int = 0


class HeldSession:
    """One voice session's upstream socket, its numbered events and its follower."""

    def __init__(
        self,
        key: tuple[str, str],
        socket: UpstreamSocket,
        *,
        hold_s: float,
        replay_max_bytes: int,
        ends: SessionEnds,
        rewrite: Callable[[bytes], bytes],
        on_end: Callable[[HeldSession, str], Any],
    ) -> None:
        self.key = key
        self.socket = socket
        self.hold_s = hold_s
        self.buffer = ReplayBuffer(replay_max_bytes)
        self.ends = ends
        self.seq = 0
        # The newest seq yielded to a caller (what a gateway may have acted on).
        self.delivered_seq = 0
        # The session as the upstream last described it (`session.created/updated`).
        self.session_json = b""
        self.follower: _Follower | None = None
        self.closing = ""  # why the broker closes the upstream ("" while it does not)
        self._rewrite = rewrite
        self._on_end = on_end
        self._hold: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None

    def start(self, first: bytes) -> None:
        """Number `first` (the configured `session.created`), then pump the upstream."""
        self.publish(first)
        self._pump = asyncio.create_task(self._run())

    def publish(self, event: bytes) -> None:
        """Number and keep one upstream event and hand it to the follower."""
        self.seq += 1
        numbered = number_event(event, self.seq)
        head = numbered[:120]
        if b'"session.created"' in head or b'"session.updated"' in head:
            self.session_json = numbered
        self.buffer.add(self.seq, numbered)
        follower = self.follower
        if follower is not None:
            follower.push(self.seq, numbered)
            if follower.size > FOLLOWER_MAX_BYTES:
                # The caller reads slower than the upstream speaks: cut it (its
                # client may resume); the session is held.
                follower.end(
                    SwitchboardError(
                        "The gateway fell too far behind the voice session.",
                        code=common_pb2.ERROR_CODE_SLOW_CONSUMER,
                    )
                )
                self.detach(follower)

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.socket.recv(decode=False)
                self.ends.events_out += 1
                self.publish(self._rewrite(frame))
        except UpstreamClosed:
            pass
        except Exception:
            log.exception("held voice session failed", extra=self.ends.ids)
        finally:
            self._cancel_hold()
            outcome = self.closing or "upstream_closed"
            if self.follower is not None:
                broken = (
                    None
                    if self.closing
                    else UpstreamStreamBroken("The upstream closed the session.")
                )
                self.follower.end(broken)
                self.follower = None
            with contextlib.suppress(Exception):
                await self.socket.close()
            await self._on_end(self, outcome)

    async def wait_ended(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._pump)

    def close(self, reason: str) -> None:
        """Close the upstream socket (the pump then ends the session)."""
        if not self.closing:
            self.closing = reason
            task = asyncio.ensure_future(self.socket.close())
            task.add_done_callback(lambda done: done.exception())

    def _cancel_hold(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    def held(self) -> bool:
        """Whether no caller follows the session (it waits for an attach)."""
        return self.follower is None and not self.closing and self._hold is not None

    def detach(self, follower: _Follower) -> None:
        """`follower` is gone without closing the session: hold it for `hold_s`."""
        follower.end()
        if self.follower is not follower:
            return
        self.follower = None
        if not self.closing and (self._pump is None or not self._pump.done()):
            loop = asyncio.get_running_loop()
            self._hold = loop.call_later(self.hold_s, self.close, "hold_expired")
            log.info("voice session held", extra={**self.ends.ids, "seq": self.seq})

    async def follow(
        self,
        requests: AsyncIterator[realtime_pb2.RealtimeRequest],
        after_seq: int,
        first: Callable[[bool], realtime_pb2.RealtimeResponse],
        on_caller_gone: Callable[[Callable[[], None]], None] | None = None,
    ) -> AsyncGenerator[Outgoing, None]:
        """Follow the session from after `after_seq`: `first(audio_lost)`, the kept
        events after it, then the live ones (in batches of bytes), while the
        caller's events go upstream.
        `on_caller_gone` registers what to run when the call ends (a gRPC done
        callback: the generator may be closed only later, the session is held at once).

        Raises:
            SwitchboardError: `resume_unavailable` (see `ReplayBuffer.after`), before
                anything is yielded or any other caller is displaced.
        """
        if self.closing:
            raise resume_refused("The voice session is closing; start a new session.")
        kept, audio_lost = self.buffer.after(after_seq)
        follower = _Follower()
        follower.events = kept
        previous, self.follower = self.follower, follower
        self._cancel_hold()
        if previous is not None:
            previous.end(SessionTakenOver("Another connection resumed this session."))
        if on_caller_gone is not None:
            on_caller_gone(lambda: self.detach(follower))
        forward = asyncio.create_task(self._forward(requests, follower))
        try:
            yield first(audio_lost)
            async for batch in follower.batches():
                yield [event for _, event in batch]
                self.delivered_seq = max(self.delivered_seq, batch[-1][0])
            if follower.failure is not None:
                yield realtime_pb2.RealtimeResponse(failure=failure_of(follower.failure))
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
            self.detach(follower)

    async def _forward(
        self, requests: AsyncIterator[realtime_pb2.RealtimeRequest], follower: _Follower
    ) -> None:
        """The caller's events, upstream, until it closes the session or goes away."""
        try:
            async for request in requests:
                if self.follower is not follower:
                    return
                if request.WhichOneof("action") == "close":
                    self.close("closed")
                    return
                for event in request.events.events:
                    self.ends.events_in += 1
                    await self.socket.send(event, text=True)
        except (grpc.RpcError, UpstreamClosed):
            pass
        finally:
            if not self.closing:
                # Gone without a close: the session is held for a resume.
                self.detach(follower)


class HeldSessions:
    """The broker's voice sessions by (tenant id, Switchboard session id)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], HeldSession] = {}

    def add(self, held: HeldSession) -> None:
        replaced = self._sessions.get(held.key)
        if replaced is not None:
            replaced.close("replaced")
        self._sessions[held.key] = held

    def get(self, tenant_id: str, session_id: str) -> HeldSession | None:
        return self._sessions.get((tenant_id, session_id))

    def remove(self, held: HeldSession) -> None:
        if self._sessions.get(held.key) is held:
            del self._sessions[held.key]

    def held_count(self) -> int:
        """Sessions waiting for an attach (no caller follows them)."""
        return sum(1 for held in self._sessions.values() if held.held())

    def __len__(self) -> int:
        return len(self._sessions)

    async def close_all(self) -> None:
        """Close every session's upstream (the broker stops)."""
        sessions = list(self._sessions.values())
        for held in sessions:
            held.close("broker_stopped")
        for held in sessions:
            await held.wait_ended()


def as_response(out: Outgoing) -> realtime_pb2.RealtimeResponse:
    """`out` as the message a `Session` call sends."""
    if isinstance(out, list):
        return realtime_pb2.RealtimeResponse(events=realtime_pb2.RealtimeEvents(events=out))
    return out
