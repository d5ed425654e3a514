"""`make run`'s supervisor: a crashed process is restarted with doubling
backoff and each restart is reported; one stopped on purpose is left alone.
Real processes, a fake clock."""

from __future__ import annotations

import sys
from pathlib import Path

from tools.stack import Service, Stack
from tools.supervisor import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_exited(service: Service) -> None:
    assert service.process is not None
    service.process.wait(timeout=10)


def test_a_crashing_service_is_restarted_with_doubling_backoff(tmp_path: Path) -> None:
    stack = Stack(log_dir=tmp_path)
    crasher = Service(
        "session",
        [sys.executable, "-c", "raise SystemExit(3)"],
        {},
        tmp_path / "session.log",
        lambda: True,
    )
    stack.services["session"] = crasher
    lines: list[str] = []
    clock = Clock()
    supervisor = Supervisor(stack, lines.append, clock)
    crasher.start()
    delays = []
    for _ in range(7):
        wait_exited(crasher)
        supervisor.check()
        assert lines[-1].startswith("session exited (exit code 3); restarting in ")
        delay = float(lines[-1].split("restarting in ")[1].split(" s")[0])
        delays.append(delay)
        clock.now += delay - 0.01
        supervisor.check()
        assert not lines[-1].endswith("restarted")  # not before its time
        clock.now += 0.02
        supervisor.check()
        assert lines[-1] == "session restarted"
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert supervisor.restarts == {"session": 7}
    # After a minute up, the next crash starts a new streak.
    wait_exited(crasher)
    clock.now += 61
    supervisor.check()
    assert "restarting in 1 s (crash 1 in a row)" in lines[-1]
    crasher.stop()


def test_a_service_stopped_on_purpose_is_left_alone(tmp_path: Path) -> None:
    stack = Stack(log_dir=tmp_path)
    sleeper = Service(
        "broker",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        {},
        tmp_path / "broker.log",
        lambda: True,
    )
    stack.services["broker"] = sleeper
    lines: list[str] = []
    supervisor = Supervisor(stack, lines.append, Clock())
    sleeper.start()
    supervisor.check()
    sleeper.stop()
    supervisor.check()
    assert lines == []
    sleeper.start()
    assert sleeper.process is not None
    sleeper.process.kill()
    sleeper.process.wait()
    supervisor.check()
    assert lines == ["broker exited (signal SIGKILL); restarting in 1 s (crash 1 in a row)"]
    sleeper.stop()
