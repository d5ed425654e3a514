"""Command line: ``python -m tools.simulator [--port 8000] ...`` serves the simulator.

Every flag can also come from ``SWITCHBOARD_SIM_<FLAG>`` (``--ttft-ms`` →
``SWITCHBOARD_SIM_TTFT_MS``); a flag on the command line wins over the environment.
Once listening it prints exactly one line, ``simulator listening on http://HOST:PORT``,
so a parent process (``make run``, benchmarks, e2e fixtures) can wait for it and read
the port when ``--port 0`` was given. SIGTERM and SIGINT stop it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from tools.simulator.server import DEFAULT_MODELS, SimulatorConfig, run_simulator

ENV_PREFIX = "SWITCHBOARD_SIM_"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError("must list at least one model id")
    return models


# flag -> (parser, default, help)
_FLAGS: dict[str, tuple[Callable[[str], Any], str | None, str]] = {
    "host": (str, "127.0.0.1", "interface to listen on"),
    "port": (_non_negative, "8000", "TCP port; 0 picks a free one"),
    "ttft-ms": (_non_negative, "50", "default time to first token (ms)"),
    "token-delay-ms": (_non_negative, "10", "default delay between tokens (ms)"),
    "reply-tokens": (_non_negative, "24", "default reply length in tokens"),
    "api-key": (str, None, "require 'Authorization: Bearer KEY' on /v1/*"),
    "models": (_models, ",".join(DEFAULT_MODELS), "comma-separated ids for GET /v1/models"),
    "moderation-delay-ms": (_non_negative, "0", "time POST /v1/moderations takes (ms)"),
}


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> SimulatorConfig:
    """Build the config from command-line flags over ``SWITCHBOARD_SIM_*`` variables.

    Args:
        argv: Arguments without the program name.
        environ: The environment to read (a dict in tests, ``os.environ`` otherwise).

    Raises:
        SystemExit: With status 2 and a message naming the flag or variable at fault.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tools.simulator",
        description="Switchboard's OpenAI-compatible upstream SIMULATOR (see docs/simulator.md).",
    )
    for flag, (convert, default, text) in _FLAGS.items():
        env = ENV_PREFIX + flag.upper().replace("-", "_")
        raw = environ.get(env, default)
        if raw is not None:
            try:
                # Validate the environment now so the error names the variable, not the flag.
                convert(raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{env} {exc}")
        parser.add_argument(
            f"--{flag}", type=convert, default=raw, help=f"{text} (env {env}, default {default})"
        )
    args = parser.parse_args(argv)
    # argparse applies `type` to string defaults, so every value is converted here.
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        ttft_ms=args.ttft_ms,
        token_delay_ms=args.token_delay_ms,
        reply_tokens=args.reply_tokens,
        api_key=args.api_key or None,
        models=args.models,
        moderation_delay_ms=args.moderation_delay_ms,
    )


async def serve(config: SimulatorConfig) -> None:
    """Serve until SIGTERM or SIGINT, announcing the address on stdout once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_simulator(config) as sim:
        print(f"simulator listening on {sim.url}", flush=True)
        await stop.wait()


def _runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop  # optional: a faster loop matters, the simulator is a benchmark baseline
    except ImportError:
        return asyncio.run

    def run(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    config = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    _runner()(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
