"""The tenant's server-side tools (toolexec), as a turn offers and runs them.

A response is offered the client's own function tools plus the tenant's
toolexec tools (a client tool of the same name wins); calls to names the client
did not declare are toolexec's to run, which answers every one of them (an
unknown or forbidden tool is an outcome, not an exception).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from switchboard.errors import SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.v1 import common_pb2, toolexec_pb2

log = logging.getLogger(__name__)

# How long the tenant's tool catalogue is kept before it is asked for again.
CATALOGUE_TTL_S = 60.0


class ServerTools:
    """The toolexec tools of one tenant, for the turns of one session."""

    def __init__(self, backends: Backends, tenant_id: str, session_id: str) -> None:
        self.backends = backends
        self.tenant_id = tenant_id
        self.session_id = session_id
        self._catalogue: tuple[float, dict[str, common_pb2.ToolDefinition]] | None = None

    async def catalogue(self) -> dict[str, common_pb2.ToolDefinition]:
        """The tenant's toolexec tools by name, cached for a minute. Without
        toolexec, none (the turn goes on with the client's tools)."""
        now = time.monotonic()
        if self._catalogue is None or now - self._catalogue[0] > CATALOGUE_TTL_S:
            try:
                tools = await self.backends.list_tools(self.tenant_id)
            except SwitchboardError as exc:
                log.warning(
                    "server tools unavailable",
                    extra={
                        "tenant_id": self.tenant_id,
                        "session_id": self.session_id,
                        "code": exc.name,
                    },
                )
                return {}
            self._catalogue = (now, {tool.name: tool for tool in tools})
        return self._catalogue[1]

    async def offered(
        self, client_tools: Iterable[common_pb2.ToolDefinition]
    ) -> list[common_pb2.ToolDefinition]:
        """Client tools plus the tenant's server tools; a client tool of the same name wins."""
        offered = list(client_tools)
        names = {tool.name for tool in offered}
        server = await self.catalogue()
        offered.extend(tool for name, tool in server.items() if name not in names)
        return offered

    async def run(self, calls: list[common_pb2.Item]) -> list[toolexec_pb2.ExecuteResponse]:
        """Run the calls in parallel; one result per call, in order (never raises)."""
        return list(
            await asyncio.gather(
                *(
                    self.backends.execute_tool(
                        self.tenant_id, self.session_id, call.call_id, call.name, call.arguments
                    )
                    for call in calls
                )
            )
        )


def server_calls(
    calls: list[common_pb2.Item], client_tools: Iterable[common_pb2.ToolDefinition]
) -> list[common_pb2.Item]:
    """The calls that are toolexec's to run: those to tools the client did not declare."""
    client_names = {tool.name for tool in client_tools}
    return [call for call in calls if call.name not in client_names]
