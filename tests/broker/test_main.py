"""`python -m switchboard.broker` as a real process: start-up, the `make run` setup, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from switchboard import rpc
from switchboard.rpc import BROKER_METADATA_KEY
from switchboard.tenancy import hash_key
from switchboard.v1 import broker_pb2_grpc
from tests.broker.harness import generate_request, kinds, user
from tools.simulator import SimulatorConfig, run_simulator

SIM_KEY = "sk-broker-main-test-0123456789abcdef"


def base_env(**env: str) -> dict[str, str]:
    """The test process's environment without any Switchboard or OpenAI setting."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SWITCHBOARD_", "OPENAI_"))
    }
    return {**inherited, **env}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def broker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard.broker",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_the_make_run_setup_serves_the_development_tenant() -> None:
    # tools/stack.py gives every service SWITCHBOARD_TENANT_KEYS and the broker
    # SWITCHBOARD_BROKER_UPSTREAM_URL / _API_KEY pointing at the simulator.
    port = free_port()
    config = SimulatorConfig(port=0, ttft_ms=0, token_delay_ms=0, api_key=SIM_KEY)
    async with run_simulator(config) as sim:
        env = base_env(
            SWITCHBOARD_TENANT_KEYS=f"t1={hash_key('sk-sb-dev')}",
            SWITCHBOARD_BROKER_UPSTREAM_URL=sim.base_url,
            SWITCHBOARD_BROKER_UPSTREAM_API_KEY=SIM_KEY,
            SWITCHBOARD_BROKER_LISTEN=f"127.0.0.1:{port}",
        )
        process = await broker(env)
        try:
            async with rpc.channel(f"127.0.0.1:{port}") as channel:
                deadline = time.monotonic() + 15
                while not await rpc.check_health(channel):
                    assert process.returncode is None, "the broker exited"
                    assert time.monotonic() < deadline, "the broker did not become healthy"
                    await asyncio.sleep(0.05)
                stub = broker_pb2_grpc.BrokerServiceStub(channel)
                call = stub.Generate(generate_request(user("hi"), model="gpt-4o-mini"))
                named = dict(await call.initial_metadata())
                events = [event async for event in call]
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
        records = await sim.streams()
    assert kinds(events)[-1] == "finished"
    # The broker names itself by its listen address when no other is advertised.
    assert named[BROKER_METADATA_KEY] == f"127.0.0.1:{port}"
    host = sim.url.removeprefix("http://")
    assert events[0].started.upstream == f"default ({host})"
    assert [(r["model"], r["outcome"]) for r in records] == [("gpt-4o-mini", "completed")]
    assert process.returncode == 0
    log = stderr.decode()
    assert SIM_KEY not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (completed,) = [line for line in lines if line["msg"] == "generate completed"]
    assert (completed["tenant_id"], completed["upstream"]) == ("t1", "default")


async def test_a_bad_tenants_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "upstreams:\n"
        "  default: {base_url: 'http://127.0.0.1:9/v1', api_key_env: SB_MISSING_KEY}\n"
        "tenants:\n"
        f"  acme: {{keys: ['{hash_key('sk-sb-acme')}'], models: {{m: {{}}}}}}\n"
    )
    process = await broker(base_env(SWITCHBOARD_TENANTS_FILE=str(path)))
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [
        f"broker: configuration error: {path}: upstreams.default.api_key_env: "
        "environment variable SB_MISSING_KEY is not set"
    ]
