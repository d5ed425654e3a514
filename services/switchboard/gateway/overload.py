"""Load shedding: refuse new work while the gateway's event loop runs late.

When a gateway (or the core it shares) is saturated, every event waits its
turn in the event loop, and time to first token grows without bound for
everyone. `LoopLag` measures how late the loop runs a timer that should fire
every `INTERVAL_S`, smoothed over about a second, and `check` refuses new work
with `server_busy` (retry after a second) while that lag is over the limit
(`SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS`): new connections, `response.create`
and HTTP requests. Work already admitted (a running response, its tool rounds,
a resumed response) goes on: shedding new work is what lets it finish.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge

from switchboard.errors import SwitchboardError
from switchboard.v1 import common_pb2

log = logging.getLogger(__name__)

# How often the loop's lateness is sampled, and over how long it is smoothed.
INTERVAL_S = 0.05
WINDOW_S = 1.0


class LoopLag:
    """The event loop's smoothed lateness, and the shed decision made from it.

    Args:
        limit_s: refuse new work while the smoothed lag is over this; 0 never
            refuses (the lag is still measured and exported).
        gauge: where the smoothed lag is exported.
    """

    def __init__(self, limit_s: float, gauge: Gauge | None = None) -> None:
        self.limit_s = limit_s
        self.lag_s = 0.0
        self._gauge = gauge
        self._shedding = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def observe(self, late_s: float, elapsed_s: float) -> None:
        """Fold one sample in: a timer ran `late_s` late after `elapsed_s`.

        The weight of a sample is the share of the window it covers, so one
        stall of a second counts fully, however few samples it allowed.
        """
        weight = min(1.0, elapsed_s / WINDOW_S)
        self.lag_s += weight * (max(0.0, late_s) - self.lag_s)
        if self._gauge is not None:
            self._gauge.set(self.lag_s)
        shedding = self.overloaded
        if shedding != self._shedding:
            self._shedding = shedding
            message = "shedding load" if shedding else "load shedding ended"
            log.warning(message, extra={"loop_lag_ms": round(self.lag_s * 1000)})

    @property
    def overloaded(self) -> bool:
        return 0 < self.limit_s < self.lag_s

    def check(self, what: str = "connect") -> None:
        """Refuse new work while overloaded.

        Args:
            what: what the client should do again ("connect", "send the request").

        Raises:
            SwitchboardError: `server_busy`, retry after a second.
        """
        if self.overloaded:
            raise SwitchboardError(
                f"This gateway is overloaded; {what} again in a moment.",
                code=common_pb2.ERROR_CODE_SERVER_BUSY,
                retry_after=1.0,
            )

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(INTERVAL_S)
            elapsed = loop.time() - started
            self.observe(elapsed - INTERVAL_S, elapsed)
