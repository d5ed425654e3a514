"""The tenants file: the example loads, defaults apply, keys and variables are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchboard.config import ConfigError, Secret
from switchboard.tenancy import (
    Deployment,
    Limits,
    ModelRoute,
    SessionDefaults,
    TenantDirectory,
    UpstreamAdmission,
    UpstreamBreaker,
    UpstreamRollover,
    hash_key,
)
from tests.tenancy.documents import (
    ACME_KEY,
    ENVIRON,
    EXAMPLE,
    LOCAL_SECRET,
    SECRETS,
    UPSTREAM_SECRET,
    document,
)

HASH = hash_key(ACME_KEY)


def test_the_example_file_loads_completely() -> None:
    directory = TenantDirectory.load(EXAMPLE, {**ENVIRON})
    assert directory.source == str(EXAMPLE)
    assert set(directory.upstreams) == {"default", "local-vllm"}
    assert directory.upstreams["default"].api_key == Secret(UPSTREAM_SECRET)
    assert directory.upstreams["local-vllm"].api_key.reveal() == LOCAL_SECRET
    assert directory.upstreams["local-vllm"].api_key_env == "VLLM_API_KEY"
    assert directory.tiers == ("free", "standard", "enterprise")
    assert directory.allow_private_hosts == ("tools.internal.svc.cluster.local",)

    acme = directory.get("acme")
    assert acme is not None
    assert acme.tier == "enterprise"
    assert len(acme.key_hashes) == 2
    assert acme.models["gpt-realtime"] == ModelRoute("gpt-realtime", "default", "gpt-4o-mini")
    assert acme.models["gpt-4o-mini"] == ModelRoute("gpt-4o-mini", "default", "gpt-4o-mini")
    assert acme.route("fast").upstream == "local-vllm"
    assert acme.route("fast").deployments == (
        Deployment("local-vllm", "meta-llama/Llama-3.1-8B-Instruct"),
    )
    assert acme.route("chat").deployments == (
        Deployment("local-vllm", "meta-llama/Llama-3.1-8B-Instruct", weight=3),
        Deployment("default", "gpt-4o-mini"),
    )
    careful = acme.route("careful")
    assert careful.deployments == (
        Deployment("default", "gpt-4o"),
        Deployment("local-vllm", "meta-llama/Llama-3.1-70B-Instruct", priority=1),
    )
    assert (careful.upstream, careful.upstream_model) == ("default", "gpt-4o")
    assert directory.upstreams["default"].admission == UpstreamAdmission(64, 256, 32, 10.0)
    assert directory.upstreams["default"].circuit_breaker == UpstreamBreaker()
    assert directory.upstreams["local-vllm"].circuit_breaker == UpstreamBreaker(3, 15.0)
    assert directory.upstreams["local-vllm"].admission == UpstreamAdmission()
    assert acme.builtins == ("calculate", "current_time")
    assert acme.webhooks[0]["name"] == "lookup_order"
    assert acme.webhooks[0]["secret_env"] == "ACME_LOOKUP_ORDER_SECRET"
    assert acme.limits == Limits(600, 200_000, 100, 20, 3600, 4096)
    assert acme.daily_token_budget == 5_000_000
    assert acme.session == SessionDefaults(
        model="gpt-realtime",
        instructions="You are Acme's assistant. Answer briefly.",
        max_output_tokens=1024,
    )

    hobbyist = directory.get("hobbyist")
    assert hobbyist is not None
    assert hobbyist.tier == "free"
    assert hobbyist.limits.requests_per_minute == 20
    assert hobbyist.limits.tokens_per_minute is None
    assert hobbyist.daily_token_budget is None
    assert hobbyist.session == SessionDefaults()
    assert hobbyist.builtins == () and hobbyist.webhooks == ()
    assert directory.raw["tenants"]["acme"]["tier"] == "enterprise"


def test_defaults_of_a_minimal_tenant() -> None:
    directory = TenantDirectory.parse(document(), ENVIRON)
    beta = directory.get("beta")
    assert beta is not None
    assert beta.tier == "standard"
    assert beta.route("gpt-4o-mini") == ModelRoute("gpt-4o-mini", "default", "gpt-4o-mini")
    assert beta.limits == Limits()
    assert beta.daily_token_budget is None
    assert beta.builtins == () and beta.webhooks == ()


def test_null_limits_mean_unlimited_and_upstream_keys_are_optional() -> None:
    data = document()
    data["tenants"]["acme"]["limits"] = {"requests_per_minute": None, "max_output_tokens": 10}
    data["tenants"]["acme"]["session"] = None
    del data["upstreams"]["local-vllm"]["api_key_env"]
    directory = TenantDirectory.parse(data, ENVIRON)
    acme = directory.get("acme")
    assert acme is not None and acme.limits == Limits(max_output_tokens=10)
    assert not directory.upstreams["local-vllm"].api_key
    assert directory.upstreams["local-vllm"].api_key_env is None


def test_a_model_may_list_deployments_with_weights_and_priorities() -> None:
    data = document()
    data["tenants"]["acme"]["models"]["gpt-realtime"] = {
        "upstream_model": "gpt-4o-mini",
        "deployments": [
            {"upstream": "local-vllm", "upstream_model": "llama", "priority": 2},
            {"upstream": "default", "weight": 5, "priority": 0},
        ],
    }
    data["upstreams"]["default"]["admission"] = {"max_queued": 0, "queue_timeout_s": 0.5}
    directory = TenantDirectory.parse(data, ENVIRON)
    acme = directory.get("acme")
    assert acme is not None
    route = acme.route("gpt-realtime")
    assert route.deployments == (
        Deployment("local-vllm", "llama", weight=1, priority=2),
        Deployment("default", "gpt-4o-mini", weight=5, priority=0),
    )
    # `upstream` and `upstream_model` name the preferred deployment.
    assert (route.upstream, route.upstream_model) == ("default", "gpt-4o-mini")
    assert directory.upstreams["default"].admission == UpstreamAdmission(
        max_queued=0, queue_timeout_s=0.5
    )


def test_hashes_are_normalized_to_lowercase() -> None:
    data = document()
    data["tenants"]["acme"]["keys"] = [f"  {HASH.upper()} "]
    directory = TenantDirectory.parse(data, ENVIRON)
    assert directory.authenticate(ACME_KEY) is directory.get("acme")


def test_a_key_hash_shared_by_two_tenants_names_both() -> None:
    data = document()
    data["tenants"]["beta"]["keys"].append(HASH)
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.parse(data, ENVIRON)
    text = str(caught.value)
    assert text.startswith("tenants.beta.keys[1]: this key hash is also a key of tenant 'acme'")
    assert "'beta'" in text
    assert HASH not in text


def test_a_missing_upstream_variable_is_named_and_no_value_is_printed() -> None:
    environ = {key: value for key, value in ENVIRON.items() if key != "OPENAI_API_KEY"}
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.parse(document(), environ)
    assert str(caught.value) == (
        "upstreams.default.api_key_env: environment variable OPENAI_API_KEY is not set"
    )
    relaxed = TenantDirectory.parse(document(), environ, require_env=False)
    assert not relaxed.upstreams["default"].api_key


def test_an_empty_variable_counts_as_unset() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        TenantDirectory.parse(document(), {**ENVIRON, "OPENAI_API_KEY": ""})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"tenants: [\n", "not valid YAML (line"),
        (
            b"tenants:\n  acme: {}\n  acme: {}\n",
            "not valid YAML (line 3 column 3: duplicate key 'acme')",
        ),
        (b"\xff\xfe", "the file is not UTF-8 text"),
        (b"", "the file is empty"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.load(path, ENVIRON)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the tenants file"):
        TenantDirectory.load(tmp_path / "absent.yaml", ENVIRON)


def test_no_secret_shows_in_reprs() -> None:
    directory = TenantDirectory.load(EXAMPLE, ENVIRON)
    text = repr(directory) + repr(list(directory)) + repr(dict(directory.upstreams))
    assert not [secret for secret in SECRETS if secret in text]
    assert not [digest for tenant in directory for digest in tenant.key_hashes if digest in text]
    assert "Acme's assistant" not in text


def test_empty_lists_may_be_left_empty() -> None:
    data = document()
    data["tenants"]["acme"].update(builtins=None, webhooks=None)
    data["allow_private_hosts"] = None
    directory = TenantDirectory.parse(data, ENVIRON)
    acme = directory.get("acme")
    assert acme is not None and acme.builtins == () and acme.webhooks == ()
    assert directory.allow_private_hosts == ()


def test_a_realtime_upstream_may_roll_sessions_over_before_its_limit() -> None:
    data = document()
    data["upstreams"]["local-vllm"].update(
        kind="realtime", rollover={"session_limit_s": 3600, "margin_s": 120}
    )
    data["upstreams"]["voice-test"] = {
        "base_url": "http://127.0.0.1:9/v1",
        "kind": "realtime",
        "rollover": {"session_limit_s": 6},
    }
    upstreams = TenantDirectory.parse(data, ENVIRON).upstreams
    assert upstreams["local-vllm"].rollover == UpstreamRollover(3600.0, 120.0)
    # Without margin_s: 300 s, or half of a shorter limit.
    assert upstreams["voice-test"].rollover == UpstreamRollover(6.0, 3.0)
    assert upstreams["default"].rollover.session_limit_s is None
