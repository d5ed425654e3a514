"""The fuzz tests' seed and figures.

Each run draws a seed (or takes `SWITCHBOARD_FUZZ_SEED`), prints it in the
report header and in every failure, and prints the figures of what it sent
(frames, errors by code, closes by code) at the end of the run.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

SEED = int(os.environ.get("SWITCHBOARD_FUZZ_SEED") or random.SystemRandom().randrange(2**31))

FIGURES: dict[str, Counter[str]] = {}


def figures(name: str) -> Counter[str]:
    """The counters of one fuzz test, printed at the end of the run."""
    return FIGURES.setdefault(name, Counter())


def pytest_report_header() -> str:
    return f"fuzz seed: {SEED} (repeat with SWITCHBOARD_FUZZ_SEED={SEED})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, counts in FIGURES.items():
        terminalreporter.write_line(
            f"fuzz {name} (seed {SEED}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        )
