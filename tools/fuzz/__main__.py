"""`make fuzz`: start the whole stack on free ports and fuzz it as an attacker
would (tools/fuzz/run.py): hostile frames over many connections, hostile
handshakes and HTTP requests. Prints the figures; exits 1 when anything was
unanswered, undocumented, hung, logged a traceback or an error, or left a
service unhealthy.

    python -m tools.fuzz                       # a new seed, ~20,000 frames
    python -m tools.fuzz --seed 1234 --connections 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from tools.fuzz.run import fuzz
from tools.stack import Ports, Stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**31))
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--frames", type=int, default=134, help="hostile frames per connection")
    parser.add_argument("--handshakes", type=int, default=400)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    print(f"fuzz seed {args.seed}: starting the stack...", flush=True)
    stack = Stack(
        ports=Ports.free(),
        simulator_args=["--ttft-ms", "0", "--token-delay-ms", "0", "--reply-tokens", "12"],
        extra_env={"SWITCHBOARD_GATEWAY_HANDSHAKE_TIMEOUT_S": "2"},
    )
    with stack:
        report = asyncio.run(
            fuzz(
                stack,
                args.seed,
                connections=args.connections,
                frames=args.frames,
                handshakes=args.handshakes,
                requests=args.requests,
            )
        )
    print(report.summary())
    print(f"logs: {stack.log_dir}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
