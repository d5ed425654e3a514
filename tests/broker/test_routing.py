"""Each call goes to the upstream its tenant's route names, with that upstream's key.

Two upstream SIMULATORS (`tools.simulator`, not models) on 127.0.0.1:0, each
requiring its own API key, are the two upstreams of a tenants file:

    alpha: fast -> up-one as model-x, smart -> up-two as model-y
    beta:  fast -> up-one as model-x

The broker is a real grpc.aio server reached through a real stub; the
simulators' observation logs show which upstream got which model. A call sent
with the wrong key would be refused with 401, so a completed call also proves
the key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from switchboard.broker.routing import UnknownTenant, resolve
from switchboard.errors import GRPC_CODE_KEY, GRPC_PARAM_KEY, InvalidRequest
from switchboard.tenancy import ModelNotAllowed, TenantDirectory, hash_key
from tests.broker.harness import (
    B,
    Stub,
    collect,
    directive,
    eventually,
    generate_request,
    kinds,
    met,
    rpc_error,
    serving,
    trailers,
    user,
)
from tools.simulator import RunningSimulator, SimulatorConfig, run_simulator

KEY_ONE = "sk-sim-upstream-one-0123456789abcdef"
KEY_TWO = "sk-sim-upstream-two-0123456789abcdef"
KEY_TWO_NEXT = "sk-sim-upstream-two-next-0123456789"
KEYS = {"SB_TEST_UP1_KEY": KEY_ONE, "SB_TEST_UP2_KEY": KEY_TWO, "SB_TEST_UP2_NEXT": KEY_TWO_NEXT}
REPLY_TOKENS = 4


def document(url_one: str, url_two: str, *, key_two_env: str = "SB_TEST_UP2_KEY") -> dict[str, Any]:
    return {
        "upstreams": {
            "up-one": {"base_url": url_one, "api_key_env": "SB_TEST_UP1_KEY"},
            "up-two": {"base_url": url_two, "api_key_env": key_two_env},
        },
        "tenants": {
            "alpha": {
                "keys": [hash_key("sk-sb-alpha")],
                "models": {
                    "fast": {"upstream": "up-one", "upstream_model": "model-x"},
                    "smart": {"upstream": "up-two", "upstream_model": "model-y"},
                },
            },
            "beta": {
                "keys": [hash_key("sk-sb-beta")],
                "models": {"fast": {"upstream": "up-one", "upstream_model": "model-x"}},
            },
        },
    }


def write(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename, as a careful operator (or the kubelet) does.
    staging = path.with_suffix(".new")
    staging.write_text(yaml.safe_dump(data))
    staging.replace(path)


def sim_config(port: int = 0, *, api_key: str) -> SimulatorConfig:
    return SimulatorConfig(
        port=port, ttft_ms=0, token_delay_ms=0, reply_tokens=REPLY_TOKENS, api_key=api_key
    )


def call(tenant: str, model: str, text: str = "hi") -> B.GenerateRequest:
    return generate_request(user(text), tenant_id=tenant, model=model)


def host(sim: RunningSimulator) -> str:
    return sim.url.removeprefix("http://")


@pytest.fixture
async def sims() -> AsyncIterator[tuple[RunningSimulator, RunningSimulator]]:
    async with (
        run_simulator(sim_config(api_key=KEY_ONE)) as one,
        run_simulator(sim_config(api_key=KEY_TWO)) as two,
    ):
        yield one, two


@pytest.fixture
def tenants_file(tmp_path: Path, sims: tuple[RunningSimulator, RunningSimulator]) -> Path:
    path = tmp_path / "tenants.yaml"
    write(path, document(sims[0].base_url, sims[1].base_url))
    return path


def file_env(path: Path) -> dict[str, str]:
    return {"SWITCHBOARD_TENANTS_FILE": str(path), **KEYS}


async def models_seen(sim: RunningSimulator) -> list[tuple[str, str]]:
    return [(r["model"], r["outcome"]) for r in await sim.streams()]


# ------------------------------------------------------------- resolve (pure)


def directory() -> TenantDirectory:
    return TenantDirectory.parse(document("http://one.test/v1", "http://two.test/v1"), KEYS)


def test_resolve_follows_the_tenants_routes() -> None:
    fast = resolve(directory(), "alpha", "fast")
    smart = resolve(directory(), "alpha", "smart")
    assert (fast.upstream.name, fast.upstream.base_url, fast.model) == (
        "up-one",
        "http://one.test/v1",
        "model-x",
    )
    assert (smart.upstream.name, smart.model) == ("up-two", "model-y")
    assert smart.upstream.api_key.reveal() == KEY_TWO
    assert KEY_TWO not in f"{smart!r} {smart}"
    assert resolve(directory(), "beta", "fast").upstream.name == "up-one"


def test_resolve_refuses_a_model_the_tenant_does_not_have() -> None:
    with pytest.raises(ModelNotAllowed) as caught:
        resolve(directory(), "beta", "smart")
    assert (caught.value.name, caught.value.param) == ("model_not_allowed", "model")


def test_resolve_refuses_an_unknown_tenant_without_naming_secrets() -> None:
    with pytest.raises(UnknownTenant) as caught:
        resolve(directory(), "gamma", "fast")
    assert caught.value.name == "permission_denied"
    assert "gamma" in caught.value.message
    assert not any(key in caught.value.message for key in KEYS.values())


def test_resolve_wants_a_model_before_anything_else() -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve(directory(), "gamma", "")
    assert (caught.value.name, caught.value.param) == ("missing_required_parameter", "model")


def test_the_model_override_replaces_only_the_upstream_model() -> None:
    target = resolve(directory(), "alpha", "smart", model_override="gpt-4o-mini")
    assert (target.upstream.name, target.model) == ("up-two", "gpt-4o-mini")
    # The tenant must still be allowed the model it asked for.
    with pytest.raises(ModelNotAllowed):
        resolve(directory(), "beta", "smart", model_override="gpt-4o-mini")


def test_development_tenants_send_any_model_to_the_default_upstream() -> None:
    env = {
        "SWITCHBOARD_TENANT_KEYS": f"dev={hash_key('sk-sb-dev')}",
        "SWITCHBOARD_BROKER_UPSTREAM_URL": "http://sim.test/v1",
    }
    target = resolve(TenantDirectory.from_key_spec(env["SWITCHBOARD_TENANT_KEYS"], env), "dev", "m")
    assert (target.upstream.name, target.upstream.base_url, target.model) == (
        "default",
        "http://sim.test/v1",
        "m",
    )


# ------------------------------------------------------- through the service


async def test_each_call_lands_on_its_upstream_with_its_model_and_key(
    sims: tuple[RunningSimulator, RunningSimulator],
    tenants_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, two = sims
    caplog.set_level(logging.INFO, logger="switchboard.broker")
    async with serving(file_env(tenants_file)) as (stub, servicer, _):
        # Nothing is built before a call needs it.
        assert servicer.clients.current() == {}
        fast = await collect(stub, call("alpha", "fast"))
        assert await models_seen(one) == [("model-x", "completed")]
        assert await models_seen(two) == []

        smart = await collect(stub, call("alpha", "smart"))
        assert await models_seen(two) == [("model-y", "completed")]

        beta = await collect(stub, call("beta", "fast"))
        assert await models_seen(one) == [("model-x", "completed")] * 2
        assert sorted(servicer.clients.current()) == ["up-one", "up-two"]

    assert fast[0].started == B.Started(upstream=f"up-one ({host(one)})", upstream_model="model-x")
    assert smart[0].started == B.Started(upstream=f"up-two ({host(two)})", upstream_model="model-y")
    assert kinds(beta)[0] == "started" and kinds(beta)[-1] == "finished"

    lines = [vars(r) for r in caplog.records if r.getMessage() == "generate completed"]
    assert [(f["tenant_id"], f["model"], f["upstream"], f["upstream_model"]) for f in lines] == [
        ("alpha", "fast", "up-one", "model-x"),
        ("alpha", "smart", "up-two", "model-y"),
        ("beta", "fast", "up-one", "model-x"),
    ]
    logged = "\n".join(repr(vars(r)) for r in caplog.records)
    assert KEY_ONE not in logged and KEY_TWO not in logged


async def test_a_model_the_tenant_may_not_use_is_refused(
    sims: tuple[RunningSimulator, RunningSimulator], tenants_file: Path
) -> None:
    async with serving(file_env(tenants_file)) as (stub, _, _):
        error, seen = await rpc_error(stub, call("beta", "smart"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert trailers(error)[GRPC_CODE_KEY] == "model_not_allowed"
    assert trailers(error)[GRPC_PARAM_KEY] == "model"
    assert "smart" in str(error.details())
    assert seen == []
    assert await models_seen(sims[0]) == await models_seen(sims[1]) == []


async def test_an_unknown_tenant_is_denied(
    sims: tuple[RunningSimulator, RunningSimulator], tenants_file: Path
) -> None:
    async with serving(file_env(tenants_file)) as (stub, _, _):
        error, seen = await rpc_error(stub, call("gamma", "fast"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert trailers(error)[GRPC_CODE_KEY] == "permission_denied"
    assert seen == []
    details = f"{error.details()} {error.trailing_metadata()}"
    assert not any(key in details for key in KEYS.values())
    assert await models_seen(sims[0]) == await models_seen(sims[1]) == []


async def test_a_reloaded_key_is_used_by_the_next_call(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(run_simulator(sim_config(api_key=KEY_ONE)))
        # up-two's first deployment is stopped halfway: its own stack, closed early.
        first_two = AsyncExitStack()
        stack.push_async_callback(first_two.aclose)
        two = await first_two.enter_async_context(run_simulator(sim_config(api_key=KEY_TWO)))
        write(path, document(one.base_url, two.base_url))
        served = await stack.enter_async_context(serving(file_env(path), reload_s=0.05))
        stub: Stub = served.stub
        for model in ("fast", "smart"):
            assert kinds(await collect(stub, call("alpha", model)))[-1] == "finished"
        before = served.servicer.clients.current()

        # The deployment behind up-two rotates its key: same address, new key.
        port = int(host(two).rsplit(":", 1)[1])
        await first_two.aclose()
        rotated = await stack.enter_async_context(
            run_simulator(sim_config(port, api_key=KEY_TWO_NEXT))
        )
        # Until the tenants file says so, the broker still sends the old key.
        error, _ = await rpc_error(stub, call("alpha", "smart"))
        assert trailers(error)[GRPC_CODE_KEY] == "upstream_error"
        assert error.details() == "The upstream rejected the configured credentials."

        write(path, document(one.base_url, two.base_url, key_two_env="SB_TEST_UP2_NEXT"))
        await eventually(lambda: met(served.tenants.version == 2), timeout_s=3.0)
        events = await collect(stub, call("alpha", "smart"))
        assert kinds(events)[-1] == "finished"
        assert await models_seen(rotated) == [
            ("model-y", "failed_status"),
            ("model-y", "completed"),
        ]

        after = served.servicer.clients.current()
        assert after["up-two"] is not before["up-two"]
        assert after["up-one"] is before["up-one"]  # untouched by the reload
        # Nothing was streaming on the replaced client: it is closed at once.
        await eventually(lambda: met(before["up-two"].closed))


async def test_a_replaced_client_finishes_its_streams_before_it_closes(
    sims: tuple[RunningSimulator, RunningSimulator], tenants_file: Path
) -> None:
    one, two = sims
    async with serving(file_env(tenants_file), reload_s=0.05) as (stub, servicer, tenants):
        slow = call("alpha", "smart", f"go on {directive(token_delay_ms=25, tokens=40)}")
        streaming = stub.Generate(slow)
        assert (await streaming.read()).WhichOneof("event") == "started"
        old = servicer.clients.current()["up-two"]
        assert old.active == 1

        # Same deployment under another name: a new base URL, so a new client.
        moved = two.base_url.replace("127.0.0.1", "localhost")
        write(tenants_file, document(one.base_url, moved))
        await eventually(lambda: met(tenants.version == 2), timeout_s=3.0)
        assert "up-two" not in servicer.clients.current()
        assert not old.closed

        fresh = await collect(stub, call("alpha", "smart"))
        assert (
            fresh[0].started.upstream == f"up-two ({host(two).replace('127.0.0.1', 'localhost')})"
        )
        assert servicer.clients.current()["up-two"] is not old
        assert not old.closed  # the slow stream is still going

        rest: list[str] = []
        while (event := await streaming.read()) is not grpc.aio.EOF:
            rest.append(str(event.WhichOneof("event")))
        assert rest == ["text_delta"] * 40 + ["finished"]
        await eventually(lambda: met(old.closed))
    assert [r["outcome"] for r in await two.streams()] == ["completed", "completed"]


async def test_a_reload_that_drops_a_tenant_denies_its_next_call(
    sims: tuple[RunningSimulator, RunningSimulator], tenants_file: Path
) -> None:
    data = document(sims[0].base_url, sims[1].base_url)
    async with serving(file_env(tenants_file), reload_s=0.05) as (stub, _, tenants):
        assert kinds(await collect(stub, call("beta", "fast")))[-1] == "finished"
        del data["tenants"]["beta"]
        write(tenants_file, data)
        await eventually(lambda: met(tenants.version == 2), timeout_s=3.0)
        error, _ = await rpc_error(stub, call("beta", "fast"))
    assert trailers(error)[GRPC_CODE_KEY] == "permission_denied"
