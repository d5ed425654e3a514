"""TenantDirectory: authentication, routing, development fallbacks, the toolexec view."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from switchboard.config import ConfigError, Secret
from switchboard.errors import code_name
from switchboard.tenancy import (
    ModelNotAllowed,
    ModelRoute,
    Tenant,
    TenantDirectory,
    Upstream,
    environment_upstream,
    hash_key,
    new_key,
)
from switchboard.toolexec.tools_config import parse_tools_config
from tests.tenancy.documents import ACME_KEY, BETA_KEY, ENVIRON, EXAMPLE, WEBHOOK_SECRET, document


@pytest.fixture
def directory() -> TenantDirectory:
    return TenantDirectory.parse(document(), ENVIRON)


def test_authenticate_finds_the_owner_of_a_key(directory: TenantDirectory) -> None:
    acme, beta = directory.authenticate(ACME_KEY), directory.authenticate(BETA_KEY)
    assert acme is not None and acme.id == "acme"
    assert beta is not None and beta.id == "beta"
    assert directory.authenticate(ACME_KEY + "x") is None
    assert directory.authenticate("") is None
    # The hash itself is not a key.
    assert directory.authenticate(hash_key(ACME_KEY)) is None


def test_get_and_iteration(directory: TenantDirectory) -> None:
    assert directory.get("acme") is directory.authenticate(ACME_KEY)
    assert directory.get("nobody") is None
    assert len(directory) == 2
    assert [tenant.id for tenant in directory] == ["acme", "beta"]


def test_routes_and_allowed_models(directory: TenantDirectory) -> None:
    acme = directory.get("acme")
    assert acme is not None
    assert acme.route("gpt-realtime").name == "gpt-realtime"
    assert acme.route("fast") == ModelRoute("fast", "local-vllm", "llama-3-8b")
    assert directory.upstreams[acme.route("fast").upstream].base_url == "http://vllm:8000/v1"
    with pytest.raises(ModelNotAllowed) as caught:
        acme.route("gpt-4o-mini")
    assert caught.value.param == "model"
    assert code_name(caught.value.code) == "model_not_allowed"
    assert "gpt-4o-mini" in caught.value.message


def test_builtins_are_allowed_by_name(directory: TenantDirectory) -> None:
    acme, beta = directory.get("acme"), directory.get("beta")
    assert acme is not None and beta is not None
    assert acme.allows_builtin("calculate") and not acme.allows_builtin("current_time")
    assert not beta.allows_builtin("calculate")


def test_a_bare_tenant_may_use_nothing() -> None:
    tenant = Tenant("acme")
    with pytest.raises(ModelNotAllowed):
        tenant.route("gpt-realtime")
    assert not tenant.allows_builtin("calculate")


def test_the_constructor_refuses_a_shared_key_hash() -> None:
    digest = hash_key("k")
    with pytest.raises(ConfigError, match="tenants 'a' and 'b' share a key hash"):
        TenantDirectory(
            tenants={
                "a": Tenant("a", key_hashes=frozenset({digest})),
                "b": Tenant("b", key_hashes=frozenset({digest})),
            },
            upstreams={},
        )


def test_a_development_tenant_may_use_everything() -> None:
    key = new_key()
    directory = TenantDirectory.from_key_spec(
        f"dev={hash_key(key)}",
        {"OPENAI_API_KEY": "sk-dev", "OPENAI_BASE_URL": "http://sim/v1"},
    )
    tenant = directory.authenticate(key)
    assert tenant is not None and tenant.id == "dev"
    assert tenant.route("anything") == ModelRoute("anything", "default", "anything")
    assert tenant.allows_builtin("calculate")
    assert tenant.route("gpt-realtime") == ModelRoute("gpt-realtime", "default", "gpt-realtime")
    assert tenant.limits.configured() == {} and tenant.daily_token_budget is None
    upstream = directory.upstreams["default"]
    assert upstream.base_url == "http://sim/v1"
    assert upstream.api_key == Secret("sk-dev") and upstream.api_key_env == "OPENAI_API_KEY"
    assert directory.tools_document() is None
    with pytest.raises(ModelNotAllowed):
        tenant.route("")


def test_environment_upstream_follows_the_broker_variables() -> None:
    assert environment_upstream({}) == Upstream("default", "https://api.openai.com/v1")
    env = {
        "OPENAI_BASE_URL": "http://a/v1",
        "SWITCHBOARD_BROKER_UPSTREAM_URL": "http://b/v1",
        "OPENAI_API_KEY": "sk-a",
        "SWITCHBOARD_BROKER_UPSTREAM_API_KEY": "sk-b",
    }
    upstream = environment_upstream(env)
    assert upstream.base_url == "http://b/v1"
    assert upstream.api_key.reveal() == "sk-b"
    assert upstream.api_key_env == "SWITCHBOARD_BROKER_UPSTREAM_API_KEY"
    with pytest.raises(ConfigError, match="SWITCHBOARD_BROKER_UPSTREAM_URL"):
        environment_upstream({"SWITCHBOARD_BROKER_UPSTREAM_URL": "ftp://x"})


def test_the_older_key_variable_gives_development_tenants() -> None:
    first, second, other = new_key(), new_key(), new_key()
    spec = f"acme={hash_key(first)}, acme={hash_key(second).upper()},beta={hash_key(other)},"
    directory = TenantDirectory.from_key_spec(spec, {})
    assert directory.authenticate(first) is directory.authenticate(second) is directory.get("acme")
    beta = directory.authenticate(other)
    assert beta is not None and beta.id == "beta" and beta.all_builtins
    assert directory.source == "SWITCHBOARD_TENANT_KEYS"
    assert len(TenantDirectory.from_key_spec("", {})) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acme", "SWITCHBOARD_TENANT_KEYS: entry 1 must be TENANT=SHA256HEX"),
        ("=abc", "SWITCHBOARD_TENANT_KEYS: entry 1 must be TENANT=SHA256HEX"),
        (f"acme={ACME_KEY}", "SWITCHBOARD_TENANT_KEYS: tenant 'acme': a key hash is not 64 hex"),
        (f"a b={hash_key('k')}", "SWITCHBOARD_TENANT_KEYS: tenant id 'a b' must match"),
        (
            f"a={hash_key('k')},b={hash_key('k')}",
            "SWITCHBOARD_TENANT_KEYS: tenants 'a' and 'b' share a key hash",
        ),
    ],
)
def test_the_older_key_variable_is_checked(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.from_key_spec(spec, {})
    assert str(caught.value).startswith(message), str(caught.value)
    assert ACME_KEY not in str(caught.value)


def test_tenants_are_read_only(directory: TenantDirectory) -> None:
    acme = directory.get("acme")
    assert acme is not None
    assert isinstance(acme.models, MappingProxyType)
    with pytest.raises(TypeError):
        acme.models["free"] = ModelRoute("free", "default", "x")  # type: ignore[index]


def test_the_toolexec_view_passes_toolexec_checks() -> None:
    directory = TenantDirectory.load(EXAMPLE, ENVIRON)
    tools_document = directory.tools_document()
    assert tools_document is not None
    tools = parse_tools_config(
        tools_document, environ=ENVIRON, builtin_names={"calculate", "current_time"}
    )
    assert tools.tenants is not None
    acme = tools.tenants["acme"]
    assert acme.builtins == {"calculate", "current_time"}
    assert acme.webhooks[0].name == "lookup_order"
    assert acme.webhooks[0].secret.reveal() == WEBHOOK_SECRET
    assert tools.tenants["hobbyist"].builtins == frozenset()
    assert tools.allow_private_hosts == {"tools.internal.svc.cluster.local"}
    # A fresh copy each time: toolexec may not reach into the directory.
    tools_document["tenants"]["acme"]["webhooks"][0]["name"] = "changed"
    assert directory.get("acme").webhooks[0]["name"] == "lookup_order"  # type: ignore[union-attr]


def test_a_realtime_url_gives_development_tenants_a_voice_model() -> None:
    environ = {
        "SWITCHBOARD_BROKER_UPSTREAM_URL": "http://sim:8090/v1",
        "SWITCHBOARD_BROKER_UPSTREAM_API_KEY": "sk-dev-upstream",
        "SWITCHBOARD_BROKER_REALTIME_URL": "http://sim:8090/v1",
    }
    directory = TenantDirectory.from_key_spec(f"t1={hash_key('sk-x')}", environ)
    route = directory.tenants["t1"].route("gpt-realtime-voice")
    upstream = directory.upstreams[route.upstream]
    assert (upstream.kind, route.upstream_model) == ("realtime", "gpt-realtime")
    assert upstream.api_key.reveal() == "sk-dev-upstream"
    assert directory.upstreams["default"].kind == "chat"
    assert (
        "realtime"
        not in TenantDirectory.from_key_spec(
            f"t1={hash_key('sk-x')}", {"SWITCHBOARD_BROKER_UPSTREAM_URL": "http://sim:8090/v1"}
        ).upstreams
    )
