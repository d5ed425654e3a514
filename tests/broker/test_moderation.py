"""The broker's ModerationService against the real simulator (and against nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchboard.broker.moderation import moderation_service
from switchboard.errors import SwitchboardError
from switchboard.tenancy import LiveTenants, hash_key
from switchboard.v1 import moderation_pb2
from tools.simulator import SimulatorConfig, run_simulator

KEY = "sk-sb-moderation-broker-test-1"


def tenants(tmp_path: Path, base_url: str, **policy: object) -> LiveTenants:
    settings = ", ".join(f"{k}: {v}" for k, v in {"mode": "input", **policy}.items())
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"""upstreams:
  default: {{base_url: "{base_url}", api_key_env: SIM_KEY}}
tenants:
  acme:
    keys: ["{hash_key(KEY)}"]
    models: {{gpt-realtime: {{}}}}
    moderation: {{{settings}}}
"""
    )
    return LiveTenants(path, {"SIM_KEY": "sim-secret-key-0001"})


def request(*texts: str) -> moderation_pb2.ModerateRequest:
    return moderation_pb2.ModerateRequest(tenant_id="acme", session_id="s", input=texts)


async def test_verdicts_come_from_the_upstream(tmp_path: Path) -> None:
    config = SimulatorConfig(port=0, api_key="sim-secret-key-0001")
    async with run_simulator(config) as sim:
        live = tenants(tmp_path, sim.base_url)
        async with moderation_service(live) as service:
            reply = await service.moderate(request("hello", "a sbflag-hate word"))
    assert [result.flagged for result in reply.results] == [False, True]
    assert list(reply.results[1].categories) == ["hate"]
    assert reply.model == "omni-moderation-latest"


async def test_an_upstream_that_fails_is_a_specific_error(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(port=0, api_key="another-key")) as sim:
        live = tenants(tmp_path, sim.base_url)
        async with moderation_service(live) as service:
            with pytest.raises(SwitchboardError) as refused:
                await service.moderate(request("hello"))
    assert refused.value.name == "upstream_error"
    assert refused.value.message == "The moderation upstream 'default' answered HTTP 401."
    # Nothing listens there any more.
    async with moderation_service(tenants(tmp_path, sim.base_url)) as service:
        with pytest.raises(SwitchboardError) as gone:
            await service.moderate(request("hello"))
    assert gone.value.name == "upstream_error"
    assert "could not be reached" in gone.value.message and sim.base_url not in gone.value.message


async def test_a_slow_upstream_times_out(tmp_path: Path) -> None:
    config = SimulatorConfig(port=0, api_key="sim-secret-key-0001", moderation_delay_ms=3000)
    async with run_simulator(config) as sim:
        live = tenants(tmp_path, sim.base_url, timeout_s=0.2)
        async with moderation_service(live) as service:
            with pytest.raises(SwitchboardError) as slow:
                await service.moderate(request("hello"))
    assert slow.value.name == "upstream_timeout"


async def test_an_unknown_tenant_is_refused(tmp_path: Path) -> None:
    async with moderation_service(tenants(tmp_path, "http://127.0.0.1:9/v1")) as service:
        with pytest.raises(SwitchboardError) as refused:
            await service.moderate(moderation_pb2.ModerateRequest(tenant_id="nobody", input=["x"]))
    assert refused.value.name == "permission_denied"
