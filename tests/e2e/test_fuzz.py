"""A short run of `make fuzz` against the real processes: hostile frames,
handshakes and HTTP requests; every one answered with a documented error,
status or close, no hang, no traceback or error line in any log, every service
healthy afterwards. The seed is printed; `SWITCHBOARD_FUZZ_SEED` repeats it."""

from __future__ import annotations

import os
import random

from tools.fuzz.run import fuzz
from tools.stack import Stack

SEED = int(os.environ.get("SWITCHBOARD_FUZZ_SEED") or random.SystemRandom().randrange(2**31))


async def test_a_short_fuzz_of_the_running_stack(stack: Stack) -> None:
    report = await fuzz(stack, SEED, connections=12, frames=60, handshakes=80, requests=80)
    print("\n" + report.summary())
    assert report.ok, report.summary()
    assert report.frames >= 12 * 50  # a connection closed early (1007, 1009) sends less
