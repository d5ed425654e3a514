"""The Realtime session object and `session.update`, as pure functions.

Used by the protocol for `session.update` and by the client-secrets endpoint to
validate the session it mints, so both accept exactly the same fields.
"""

from __future__ import annotations

from typing import Any

from switchboard.errors import InvalidRequest, invalid_value, missing_parameter, quote
from switchboard.gateway import fields, mcp_config
from switchboard.v1 import common_pb2, session_pb2

Event = dict[str, Any]

SESSION_FIELDS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "audio",
        "include",
        "tracing",
        "prompt",
        "truncation",
        "parallel_tool_calls",
        "reasoning",
    }
)
# What an ephemeral secret fixes for the browser that holds it.
LOCKABLE_FIELDS = ("model", "instructions", "tools")
_PASSTHROUGH = ("audio", "include", "tracing", "prompt", "truncation")


def initial_session(session_id: str, config: session_pb2.SessionConfig) -> Event:
    """The session object of `session.created` for a new session."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": config.model,
        "output_modalities": ["text"],
        "instructions": config.instructions,
        "tools": [],
        "tool_choice": config.tool_choice or "auto",
        "max_output_tokens": config.max_output_tokens or "inf",
        "tracing": None,
        "prompt": None,
        "truncation": "auto",
        "include": None,
    }


def served_audio(session: Event) -> Event:
    """`session` as a text session serves it: an `audio` object the client sent keeps
    its formats and voice, but reports no turn detection, transcription or noise
    reduction, none of which a text session runs (docs/protocol.md). The Agents
    SDK reads `turn_detection.interrupt_response` and, when true, leaves the
    cancel of an interrupted response to the server, which here would never come."""
    audio = session.get("audio")
    if not isinstance(audio, dict):
        return session
    served_input = dict(audio.get("input") or {})
    served_input.update(turn_detection=None, transcription=None, noise_reduction=None)
    return {**session, "audio": {**audio, "input": served_input}}


def check_locked(raw: Event, session: Event, locked: frozenset[str]) -> None:
    """Refuse an update of a field an ephemeral secret fixed (`field_locked`)."""
    for name in LOCKABLE_FIELDS:
        if name in locked and name in raw and raw[name] != session.get(name):
            raise InvalidRequest(
                f"'session.{name}' was fixed when this client secret was created and "
                "cannot be changed.",
                code=common_pb2.ERROR_CODE_FIELD_LOCKED,
                param=f"session.{name}",
            )


def apply_update(
    session: Event,
    config: session_pb2.SessionConfig,
    raw: Any,
    *,
    locked: frozenset[str] = frozenset(),
    mcp_servers: mcp_config.Servers | None = None,
) -> tuple[Event, session_pb2.SessionConfig]:
    """Validate a `session` object and apply it to copies of `session` and `config`.

    Args:
        mcp_servers: the tenant's registered MCP servers, the only ones an
            `{"type": "mcp"}` tool may name (none when None).

    Raises:
        InvalidRequest: naming the offending field; `field_locked` when the update
            would change a field in `locked`.
    """
    if raw is None:
        raise missing_parameter("session")
    if not isinstance(raw, dict):
        raise invalid_value("session", "Invalid type for 'session': expected an object.")
    fields.reject_unknown(raw, SESSION_FIELDS, "session")
    session_type = raw.get("type")
    if session_type is None:
        raise missing_parameter("session.type")
    if session_type == "transcription":
        raise InvalidRequest(
            "Transcription sessions are not supported.",
            code=common_pb2.ERROR_CODE_UNSUPPORTED_FEATURE,
            param="session.type",
        )
    if session_type != "realtime":
        raise invalid_value(
            "session.type", f"Invalid value: {quote(session_type)}. Expected 'realtime'."
        )
    check_locked(raw, session, locked)
    session = dict(session)
    updated = session_pb2.SessionConfig()
    updated.CopyFrom(config)
    if "model" in raw:
        updated.model = fields.model(raw, "session")
        session["model"] = updated.model
    if "instructions" in raw:
        updated.instructions = fields.instructions(raw, "session")
        session["instructions"] = updated.instructions
    if "max_output_tokens" in raw:
        updated.max_output_tokens = fields.max_output_tokens(raw["max_output_tokens"], "session")
        session["max_output_tokens"] = updated.max_output_tokens or "inf"
    if "tools" in raw:
        tools, mcp = mcp_config.split_tools(raw["tools"], "session.tools", mcp_servers or {})
        del updated.tools[:]
        updated.tools.extend(tools)
        del updated.mcp_tools[:]
        updated.mcp_tools.extend(mcp)
        session["tools"] = raw["tools"]
    if "tool_choice" in raw:
        updated.tool_choice = fields.tool_choice(raw["tool_choice"], "session.tool_choice")
        session["tool_choice"] = raw["tool_choice"]
    if "output_modalities" in raw:
        session["output_modalities"] = fields.output_modalities(raw["output_modalities"], "session")
    for name in _PASSTHROUGH:
        if name in raw:
            session[name] = raw[name]
    return session, updated
