"""Resuming a session (the resume extension, docs/protocol.md): where the client
left off, the events it missed, and the response a dead gateway left open.

A client reconnects, to any gateway, with `?session_id=...&last_event_id=...`.
At the handshake, `resume_point` reads those and `check_resumable` refuses a
resume the log cannot serve. After the socket is accepted, `replay` sends the
missed events, following the log while the session's previous connection still
writes it, until this connection holds the session's writer lease. If the
previous writer died in the middle of a response, `reopen_response` takes the
response up from its logged events, to be finished by re-attaching to its
model call at its broker (`turns.Reattach`).

A connection sends deltas before it records them (sender.py), so a client's
last event may be a delta the log never got, its writer having died first.
Its id carries its output offset (ids.py): the resume then goes on from that
offset of the output opened last, taking the text between the log's end and
the client's from the call's transcript at the broker, and numbers its events
after the client's last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import orjson

from switchboard.errors import SwitchboardError, invalid_value
from switchboard.gateway.backends import Backends
from switchboard.gateway.eventlog import SessionWriter
from switchboard.gateway.ids import event_position
from switchboard.gateway.protocol import RealtimeProtocol
from switchboard.gateway.responses import ClientAhead
from switchboard.gateway.turns import Reattach
from switchboard.v1 import common_pb2, session_pb2

log = logging.getLogger(__name__)

# How often a resuming connection reads the log while another connection writes it.
FOLLOW_POLL_S = 0.05


class Resume(NamedTuple):
    session_id: str
    after_seq: int
    # The client's last event: its id, and its output offset when it is a delta.
    last_event_id: str = ""
    offset: int | None = None

    def ahead_of(self, session: session_pb2.Session) -> ClientAhead | None:
        """The client's lead over the session's log, when its last event is a
        delta the log lacks (its writer died before recording it)."""
        if self.offset is None or self.after_seq <= session.last_event_seq:
            return None
        return ClientAhead(self.last_event_id, self.offset)


def resume_point(query: dict[str, str]) -> Resume | None:
    """The resume extension's query parameters: `session_id` and the
    `last_event_id` the client saw (none: replay the whole log)."""
    session_id = query.get("session_id")
    if session_id is None:
        return None
    last_event_id = query.get("last_event_id") or ""
    if not last_event_id:
        return Resume(session_id, 0)
    position = event_position(last_event_id)
    if position is None:
        raise invalid_value("last_event_id", "'last_event_id' is not an event id of this session.")
    return Resume(session_id, position.seq, last_event_id, position.offset)


async def check_resumable(
    backends: Backends, tenant_id: str, session: session_pb2.Session, resume: Resume
) -> None:
    """Refuse a resume whose missed events are not all in the session's log, or
    (past the log's end) in the transcript of the response it has open."""
    after_seq = resume.after_seq
    page = await backends.read_events(tenant_id, session.id, after_seq, limit=1)
    if after_seq < page.trimmed_seq:
        raise resume_unavailable()
    if after_seq > page.last_seq and (resume.offset is None or not session.open_response_id):
        # Past the log's end only a delta of an open response can be: sent
        # before it was recorded (its writer records it soon, or died).
        raise resume_unavailable()


async def replay(
    writer: SessionWriter, after_seq: int, send: Callable[[str], Awaitable[None]]
) -> int:
    """Send the logged events after `after_seq`, following the log while another
    connection still writes it, until `writer` holds the session.

    Returns:
        The seq of the last event sent (`after_seq` when none was).
    """
    backends = writer.backends
    while True:
        # Claim first: once claimed nobody else appends, so the read that follows
        # sees the whole log.
        claim = await backends.claim_session(
            writer.tenant_id, writer.session_id, writer.holder, writer.lease_ms
        )
        async for event in read_log(backends, writer.tenant_id, writer.session_id, after_seq):
            await send(event.payload.decode())
            after_seq = event.seq
        if claim.claimed:
            return after_seq
        await asyncio.sleep(FOLLOW_POLL_S)


async def read_log(
    backends: Backends, tenant_id: str, session_id: str, after_seq: int
) -> AsyncIterator[session_pb2.SessionEvent]:
    """The session's logged events after `after_seq`, page by page.

    Raises:
        SwitchboardError: `resume_unavailable` when events after `after_seq`
            were trimmed; what the session service raised.
    """
    while True:
        page = await backends.read_events(tenant_id, session_id, after_seq)
        if after_seq < page.trimmed_seq:
            raise resume_unavailable()
        if not page.events:
            return
        for event in page.events:
            yield event
        after_seq = page.events[-1].seq


def resume_unavailable() -> SwitchboardError:
    """The refusal of a resume whose missed events are not all in the log."""
    return SwitchboardError(
        "The events after 'last_event_id' are not in this session's log any more; "
        "start a new session.",
        code=common_pb2.ERROR_CODE_RESUME_UNAVAILABLE,
        param="last_event_id",
    )


async def reopen_response(
    backends: Backends,
    protocol: RealtimeProtocol,
    session: session_pb2.Session,
    ahead: ClientAhead | None = None,
) -> Reattach | None:
    """Take over the response the session's last writer left streaming when it
    died, to finish it by re-attaching to its model call at its broker (from the
    client's last delta when it is `ahead` of the log). When its events cannot
    be read back, end it `failed` with `response_interrupted`."""
    response_id = session.open_response_id
    extra = {"tenant_id": session.tenant_id, "session_id": session.id, "response_id": response_id}
    try:
        if session.open_response_seq <= 0:
            raise ValueError("the response's first event is not known")
        logged = [
            orjson.loads(event.payload)
            async for event in read_log(
                backends, session.tenant_id, session.id, session.open_response_seq - 1
            )
        ]
        command = protocol.reopen(logged, ahead)
    except (SwitchboardError, ValueError, orjson.JSONDecodeError) as exc:
        log.warning("response not taken over", extra={**extra, "detail": str(exc)[:200]})
        protocol.interrupted(response_id)
        return None
    log.info("response taken over", extra={**extra, "broker": session.open_response_broker})
    return Reattach(command, session.open_response_broker)
