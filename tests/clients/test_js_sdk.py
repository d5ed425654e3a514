"""The TypeScript SDK (clients/js, built by `make setup`) in Node against the real
stack: tests/clients/js_scenarios.mjs runs each scenario and prints its result;
its own unit tests run with Node's test runner."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.clients.conftest import gateway_serving, gateway_urls
from tools.stack import ROOT, Stack

SCRIPT = Path(__file__).with_name("js_scenarios.mjs")
JS = ROOT / "clients" / "js"


def test_the_unit_tests_pass_in_nodes_test_runner() -> None:
    run = subprocess.run(
        ["node", "--test", "test/"], cwd=JS, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "# fail 0" in run.stdout


async def scenario(stack: Stack, name: str, on_line: Any = None) -> dict[str, Any]:
    seed = random.randrange(1 << 30)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPT),
        name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "SB_URLS": ",".join(gateway_urls(stack)),
            "SB_HTTP": stack.gateway_url,
            "SB_KEY": stack.dev_key,
            "SB_SEED": str(seed),
        },
    )
    assert process.stdout is not None and process.stdin is not None
    result: dict[str, Any] | None = None
    async with asyncio.timeout(90):
        async for raw in process.stdout:
            line = json.loads(raw)
            if "result" in line:
                result = line["result"]
            elif on_line is not None:
                await on_line(line, process.stdin)
            else:
                print(line)
        stderr = await process.stderr.read() if process.stderr else b""
        await process.wait()
    assert result is not None, f"seed {seed}: {stderr.decode()[-2000:]}"
    print(f"\njs sdk, {name}: seed {seed}, {result}")
    return result


async def test_dropped_sockets_lose_and_repeat_nothing(stack: Stack) -> None:
    result = await scenario(stack, "drops")
    assert result["mismatches"] == 0
    assert result["resumed"] == result["cuts"] > 0
    assert result["duplicates"] == result["repeats"] == 0


async def test_a_voice_sessions_reply_audio_comes_out_whole_across_a_cut(stack: Stack) -> None:
    result = await scenario(stack, "voice")
    assert result["status"] == "completed" and result["resumed"]
    assert result["audioMs"] == result["replyMs"]
    assert result["duplicates"] == result["repeats"] == 0
    assert result["next"] == "completed"


async def signalled(stack: Stack, name: str, signum: int) -> dict[str, Any]:
    """Run scenario `name`, sending `signum` to the gateway it names when it asks."""
    chosen: list[str] = []

    async def send_signal(line: dict[str, Any], stdin: asyncio.StreamWriter) -> None:
        service = stack.services[gateway_serving(stack, line[name])]
        chosen.append(service.name)
        service.process.send_signal(signum)  # type: ignore[union-attr]
        stdin.write(b"done\n")
        await stdin.drain()

    try:
        return await scenario(stack, name, send_signal)
    finally:
        for service_name in chosen:
            stack.services[service_name].stop()
            stack.restart(service_name)


async def test_a_killed_gateway_is_resumed_on_the_other(stack: Stack) -> None:
    result = await signalled(stack, "kill", signal.SIGKILL)
    assert result["status"] == "completed" and result["same"]
    assert result["resumed"] and result["lostMidStream"]
    assert result["duplicates"] == result["repeats"] == 0
    assert result["resumes"] == 1 and "resuming" in result["states"]


async def test_a_draining_gateway_hands_the_client_to_the_other(stack: Stack) -> None:
    result = await signalled(stack, "drain", signal.SIGTERM)
    assert result == {
        "status": "completed",
        "same": True,
        "next": "completed",
        "closeCode": 1012,
        "duplicates": 0,
        "repeats": 0,
    }


async def test_a_bad_key_is_not_retried(stack: Stack) -> None:
    result = await scenario(stack, "bad_key")
    assert result["auth"] and result["status"] == 401
    assert result["states"] == ["connecting", "closed"]


async def test_the_token_provider_refreshes_refused_and_expiring_secrets(stack: Stack) -> None:
    result = await scenario(stack, "provider")
    assert result == {"afterConnect": 2, "afterResume": 3, "resumed": True}


async def test_client_tools_are_plain_async_functions(stack: Stack) -> None:
    result = await scenario(stack, "tools")
    assert result["calls"] == ["Oslo"]
    assert result["statuses"] == ["completed", "completed"]
