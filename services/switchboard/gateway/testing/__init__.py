"""Fakes of the gateway's backends, for in-process tests of turns and connections.

As `temporalio.testing` ships beside Temporal's SDK, these ship beside the real
thing and follow its contracts, so a test of the gateway needs no other process:

- `MemoryBackends` is the session service (sessions, items, the event log and
  its writer lease, with the same fencing and numbering as the Redis scripts),
  toolexec (canned tools) and the broker (scripted model calls) in memory. It
  implements `switchboard.gateway.backends.Backends`; `create_app(...,
  backends=MemoryBackends())` serves the real app over it.
- `Script` scripts one model call: `Text`, `Call`, `Finish`, `Fail` and `Wait`
  steps, streamed as the broker would stream them. Calls take the scripts
  queued with `MemoryBackends.model.queue(...)` in order; with none queued, a
  call answers "ok" and finishes.
- `MemorySocket` is a client's WebSocket in memory: the test sends frames,
  reads what the gateway sent, pauses reading (a slow consumer) and leaves.

What the fakes leave out is said where it matters: no TTLs, no trimming of the
log, no context budget (every item is in the context).
"""

from switchboard.gateway.testing.backends import CannedTool, MemoryBackends, canned_tool
from switchboard.gateway.testing.model import (
    Call,
    Fail,
    Finish,
    Script,
    ScriptedCall,
    ScriptedModel,
    Step,
    Text,
    Wait,
    reply,
)
from switchboard.gateway.testing.socket import MemorySocket, eventually

__all__ = [
    "Call",
    "CannedTool",
    "Fail",
    "Finish",
    "MemoryBackends",
    "MemorySocket",
    "Script",
    "ScriptedCall",
    "ScriptedModel",
    "Step",
    "Text",
    "Wait",
    "canned_tool",
    "eventually",
    "reply",
]
