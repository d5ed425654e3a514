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

# How long a tenant's tool catalogue is kept before it is asked for again.
CATALOGUE_TTL_S = 60.0

Catalogue = dict[str, common_pb2.ToolDefinition]


class ToolCatalogues:
    """The tenants' toolexec tool catalogues, shared by the sessions that use
    it (all of a gateway's): each fetched at most once a `CATALOGUE_TTL_S`, and
    sessions that miss it while it is being fetched wait for that one
    `ListTools` call."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self._cached: dict[str, tuple[float, Catalogue]] = {}
        # A fetch under way, by tenant: its outcome (None: the fetch was cancelled).
        self._fetching: dict[str, asyncio.Future[Catalogue | SwitchboardError | None]] = {}

    async def get(self, tenant_id: str, session_id: str) -> Catalogue:
        """The tenant's toolexec tools by name. Without toolexec, none (the turn
        goes on with the client's tools); the next call asks again."""
        while True:
            cached = self._cached.get(tenant_id)
            if cached is not None and time.monotonic() - cached[0] <= CATALOGUE_TTL_S:
                return cached[1]
            fetching = self._fetching.get(tenant_id)
            if fetching is None:
                break
            # Shielded: a session that stops waiting does not cancel the fetch.
            outcome = await asyncio.shield(fetching)
            if outcome is not None:
                return self._served(outcome, tenant_id, session_id)
            # The session that fetched stopped waiting: fetch here.
        done = self._fetching[tenant_id] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        outcome = None
        try:
            tools = await self.backends.list_tools(tenant_id)
            outcome = {tool.name: tool for tool in tools}
            self._cached[tenant_id] = (now, outcome)
        except SwitchboardError as exc:
            outcome = exc
        finally:
            del self._fetching[tenant_id]
            done.set_result(outcome)
        return self._served(outcome, tenant_id, session_id)

    @staticmethod
    def _served(
        outcome: Catalogue | SwitchboardError, tenant_id: str, session_id: str
    ) -> Catalogue:
        if isinstance(outcome, SwitchboardError):
            log.warning(
                "server tools unavailable",
                extra={"tenant_id": tenant_id, "session_id": session_id, "code": outcome.name},
            )
            return {}
        return outcome


class ServerTools:
    """The toolexec tools of one tenant, for the turns of one session.

    Args:
        catalogues: the catalogues shared with the gateway's other sessions;
            by default this session's own.
    """

    def __init__(
        self,
        backends: Backends,
        tenant_id: str,
        session_id: str,
        catalogues: ToolCatalogues | None = None,
    ) -> None:
        self.backends = backends
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.catalogues = catalogues or ToolCatalogues(backends)

    async def catalogue(self) -> Catalogue:
        """The tenant's toolexec tools by name, cached for a minute. Without
        toolexec, none (the turn goes on with the client's tools)."""
        return await self.catalogues.get(self.tenant_id, self.session_id)

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
