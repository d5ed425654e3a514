"""Benchmark: what output moderation costs, by hold-back, against no moderation.

Starts the whole stack (the launcher of `make run`) with a tenants file of
tenants that differ only in their moderation policy: `off` (the baseline) and
`input_output` with `hold_back_chars` 0, 100 and 1000 (window 200, overlap
100). The simulator answers each moderation check after `--check-ms` (a real
moderation model takes tens of milliseconds). Each run is one Realtime turn
per tenant, interleaved; the client measures time to first token (from
`response.create` to the first text delta) and the whole response time.

It prints medians and each policy's ratio to the baseline of the same run.
Expect: with hold-back 0 the first token waits for a check (TTFT grows by
about one check); with a hold-back larger than a window's worth of text ahead,
text flows while checks run behind it and TTFT stays near the baseline, at
the price of up to that many unchecked characters reaching the client.

    python -m tools.bench_moderation [--runs 20] [--check-ms 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import orjson

from switchboard.tenancy import hash_key
from tools.bench_ttft import gateway_once
from tools.stack import Ports, Stack

POLICIES: dict[str, str] = {
    "off": "{mode: off}",
    "hold-0": "{mode: input_output, window_chars: 200, overlap_chars: 100, hold_back_chars: 0}",
    "hold-100": "{mode: input_output, window_chars: 200, overlap_chars: 100, hold_back_chars: 100}",
    "hold-1000": (
        "{mode: input_output, window_chars: 200, overlap_chars: 100, hold_back_chars: 1000}"
    ),
}
REPLY = {"ttft_ms": 20, "token_delay_ms": 2, "tokens": 150}


def key_of(name: str) -> str:
    return f"sk-sb-bench-moderation-{name}-0001"


def tenants_yaml(ports: Ports) -> str:
    tenants = "".join(
        f"""  t_{name.replace("-", "_")}:
    keys: ["{hash_key(key_of(name))}"]
    models:
      gpt-realtime: {{}}
    moderation: {policy}
"""
        for name, policy in POLICIES.items()
    )
    return f"""upstreams:
  default:
    base_url: http://127.0.0.1:{ports.simulator}/v1
    api_key_env: SWITCHBOARD_BROKER_UPSTREAM_API_KEY
tenants:
{tenants}"""


async def turn(url: str, key: str, run: int) -> tuple[float, float]:
    """(time to first token, whole response) of one turn, in seconds."""
    text = f"benchmark run {run} [[sim {orjson.dumps(REPLY).decode()}]]"
    sample = await gateway_once(url, key, text)
    return sample.ttft_s, sample.ttft_s + sample.stream_s


async def main_async(runs: int, check_ms: int) -> None:
    ports = Ports.free()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tenants.yaml"
        path.write_text(tenants_yaml(ports))
        stack = Stack(
            ports=ports,
            simulator_args=["--moderation-delay-ms", str(check_ms)],
            extra_env={"SWITCHBOARD_TENANTS_FILE": str(path)},
        )
        with stack:
            url = f"{stack.websocket_url}?model=gpt-realtime"
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
            for name in POLICIES:  # warm up every path once
                await turn(url, key_of(name), -1)
            for run in range(runs):
                for name in POLICIES:
                    samples[name].append(await turn(url, key_of(name), run))
    base_ttft = statistics.median(s[0] for s in samples["off"])
    base_total = statistics.median(s[1] for s in samples["off"])
    reply_chars = "150 words"
    print(
        f"output moderation, {runs} runs, checks take {check_ms} ms, "
        f"replies of {reply_chars} (window 200 chars, overlap 100)"
    )
    print(f"{'policy':<10} {'TTFT ms':>9} {'ratio':>7} {'response ms':>12} {'ratio':>7}")
    for name, values in samples.items():
        ttft = statistics.median(v[0] for v in values)
        total = statistics.median(v[1] for v in values)
        print(
            f"{name:<10} {ttft * 1000:>9.1f} {ttft / base_ttft:>7.2f} "
            f"{total * 1000:>12.1f} {total / base_total:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_moderation")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--check-ms", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main_async(args.runs, args.check_ms))


if __name__ == "__main__":
    main()
