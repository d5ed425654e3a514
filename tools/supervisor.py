"""The launcher's supervisor: what Kubernetes does for crashed containers, for
`make run` (tools/stack.py) and the fault tests."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tools.stack import Stack


class Supervisor:
    """Restarts a service (or the stack's Redis) that crashed, as Kubernetes
    restarts a crashed container: after 1 s, doubling up to 30 s while it keeps
    crashing (the streak ends once it has run for a minute), each exit and
    restart reported. A service stopped on purpose (`Service.stop`,
    `Stack.restart`, `RedisServer.stop`) is left alone.
    """

    FIRST_DELAY_S = 1.0
    MAX_DELAY_S = 30.0
    STABLE_AFTER_S = 60.0

    def __init__(
        self,
        stack: Stack,
        report: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack = stack
        self.report = report
        self.clock = clock
        # name -> (crashes in a row, when it was last started)
        self._streak: dict[str, tuple[int, float]] = {}
        # name -> when to start it again
        self._due: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.check()

    def check(self) -> None:
        """Note what crashed; start what is due."""
        now = self.clock()
        redis = self.stack.redis
        crashed = [name for name, svc in self.stack.services.items() if svc.crashed()]
        if redis is not None and redis.crashed():
            crashed.append("redis")
        for name in crashed:
            if name in self._due:
                continue
            count, started = self._streak.get(name, (0, now))
            count = 1 if now - started >= self.STABLE_AFTER_S else count + 1
            delay = min(self.FIRST_DELAY_S * 2 ** (count - 1), self.MAX_DELAY_S)
            self._streak[name] = (count, started)
            self._due[name] = now + delay
            self.report(
                f"{name} exited ({self._exit_status(name)}); restarting in {delay:g} s"
                f" (crash {count} in a row)"
            )
        for name, due in list(self._due.items()):
            if now < due or self._stop.is_set():
                continue
            del self._due[name]
            try:
                self._start(name)
            except (OSError, RuntimeError) as exc:
                self.report(f"{name} did not start again: {exc}")
                continue
            self._streak[name] = (self._streak[name][0], self.clock())
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.report(f"{name} restarted")

    def _exit_status(self, name: str) -> str:
        if name == "redis":
            return "redis-server died"
        process = self.stack.services[name].process
        code = process.returncode if process is not None else None
        if code is not None and code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _start(self, name: str) -> None:
        if name == "redis":
            assert self.stack.redis is not None
            self.stack.redis.start()
        else:
            self.stack.services[name].start()
