"""The client SDKs against the real processes: two gateways (each with its broker)
sharing the session service and Redis, as in tests/e2e/test_resume.py."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import assert_no_secret_leaks
from tools.stack import Ports, Stack

# The writer lease of a killed gateway lapses after 1 s (10 s by default).
LEASE_S = "1"
# A broker keeps a dead gateway's model call for 6 s (60 s by default).
ORPHAN_GRACE_S = "6"


@pytest.fixture(scope="package")
def stack() -> Iterator[Stack]:
    stack = Stack(
        ports=Ports.free(),
        replicas=2,
        demo=True,
        simulator_args=["--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "12"],
        extra_env={
            "SWITCHBOARD_GATEWAY_SESSION_LEASE_S": LEASE_S,
            "SWITCHBOARD_BROKER_ORPHAN_GRACE_S": ORPHAN_GRACE_S,
            "SWITCHBOARD_GATEWAY_DRAIN_TIMEOUT_S": "10",
        },
    )
    with stack:
        yield stack
    assert_no_secret_leaks(stack)


def gateway_urls(stack: Stack) -> list[str]:
    return [f"ws://127.0.0.1:{port}/v1/realtime" for port in stack.gateway_ports]


def mint_secret(stack: Stack, seconds: int = 600) -> tuple[str, float]:
    """An `ek_` secret minted with the development key (as a backend would)."""
    body = json.dumps(
        {
            "expires_after": {"anchor": "created_at", "seconds": seconds},
            "session": {"type": "realtime", "model": "gpt-realtime"},
        }
    ).encode()
    request = urllib.request.Request(
        f"{stack.gateway_url}/v1/realtime/client_secrets",
        data=body,
        headers={"Authorization": f"Bearer {stack.dev_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    return str(answer["value"]), float(answer["expires_at"])


def gateway_serving(stack: Stack, url: str | None) -> str:
    """The name of the gateway service a client's connection URL points at."""
    assert url is not None
    port = int(url.split(":")[2].split("/")[0])
    for name, service in stack.services.items():
        if name.startswith("gateway") and service.env["SWITCHBOARD_GATEWAY_PORT"] == str(port):
            return name
    raise AssertionError(f"no gateway listens on {port}")
