"""The gateway's drain on SIGTERM: out of the load balancer, running responses
finish, then connections close with 1012 and the client resumes elsewhere.

`DrainingServer` is uvicorn with the drain before its shutdown; `Drainer`
holds the live connections (anything `Drainable`) and ends them.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Protocol

import uvicorn

from switchboard.errors import SwitchboardError
from switchboard.v1 import common_pb2

log = logging.getLogger(__name__)


class Drainable(Protocol):
    def drain(self) -> None:
        """End once the running turn ends (the client resumes elsewhere)."""

    def stop_now(self) -> None:
        """The drain deadline passed: stop the running turn and end."""


class Drainer:
    """The gateway's live connections, and the drain that ends them on SIGTERM."""

    def __init__(self) -> None:
        self.connections: set[Drainable] = set()
        self.draining = False
        self._none_left = asyncio.Event()
        self._none_left.set()

    def check_open(self, what: str = "connect") -> None:
        """Refuse new work while draining: `server_busy`, retry after a second
        (elsewhere: this replica is out of the load balancer).

        Args:
            what: what the client should do again ("connect", "send the request").
        """
        if self.draining:
            raise SwitchboardError(
                f"This gateway is shutting down; {what} again.",
                code=common_pb2.ERROR_CODE_SERVER_BUSY,
                retry_after=1.0,
            )

    def add(self, connection: Drainable) -> None:
        self.connections.add(connection)
        self._none_left.clear()
        if self.draining:
            connection.drain()

    def discard(self, connection: Drainable) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._none_left.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking connections (readiness false), let running responses
        finish for up to `timeout_s`, closing each connection with 1012 when its
        turn ends; then cut the rest (their responses end `cancelled`)."""
        self.draining = True
        log.info("draining", extra={"connections": len(self.connections)})
        for connection in list(self.connections):
            connection.drain()
        try:
            await asyncio.wait_for(self._none_left.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain deadline passed", extra={"connections": len(self.connections)})
            for connection in list(self.connections):
                connection.stop_now()
            await self._none_left.wait()
        log.info("drained")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its shutdown.

    On the first SIGTERM or SIGINT, the gateway drains (readiness false, new
    connections refused, running responses finish, connections closed with 1012)
    for up to the drain timeout, then uvicorn shuts down as usual. A second
    signal skips the rest of the drain.
    """

    def __init__(self, config: uvicorn.Config, drainer: Drainer, timeout_s: float) -> None:
        super().__init__(config)
        self.drainer = drainer
        self.timeout_s = timeout_s
        self._drain: asyncio.Task[None] | None = None
        self._signalled = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signalled += 1
        if self._signalled > 1:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain is None:
            self._drain = asyncio.create_task(self.drainer.drain(self.timeout_s))
        if self._drain is not None and self._drain.done():
            return True
        return await super().on_tick(counter)
