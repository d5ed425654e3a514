"""Settings are read from a mapping, validated at start, and name the bad variable."""

from __future__ import annotations

import pytest

from switchboard.config import (
    BrokerSettings,
    ConfigError,
    GatewaySettings,
    Secret,
    SessionSettings,
    ToolExecSettings,
)
from switchboard.tenancy import TenantDirectory, hash_key, new_key


def test_defaults() -> None:
    settings = GatewaySettings.from_environ({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.session_target == "127.0.0.1:50051"


def test_gateway_port_from_environment() -> None:
    assert GatewaySettings.from_environ({"SWITCHBOARD_GATEWAY_PORT": "9001"}).port == 9001


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"SWITCHBOARD_GATEWAY_PORT": "eighty"}, "SWITCHBOARD_GATEWAY_PORT"),
        ({"SWITCHBOARD_GATEWAY_PORT": "70000"}, "SWITCHBOARD_GATEWAY_PORT"),
        ({"SWITCHBOARD_GATEWAY_BROKER_TARGET": "nohost"}, "SWITCHBOARD_GATEWAY_BROKER_TARGET"),
        ({"SWITCHBOARD_GATEWAY_MAX_FRAME_BYTES": "2048"}, "SWITCHBOARD_GATEWAY_MAX_FRAME_BYTES"),
    ],
)
def test_gateway_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_environ(environ)


def test_session_redis_url_is_validated_and_secret() -> None:
    with pytest.raises(ConfigError, match="SWITCHBOARD_REDIS_URL"):
        SessionSettings.from_environ({"SWITCHBOARD_REDIS_URL": "http://x"})
    settings = SessionSettings.from_environ({"SWITCHBOARD_REDIS_URL": "redis://:pw@h:1/0"})
    assert "pw" not in repr(settings)


def test_broker_key_never_prints() -> None:
    settings = BrokerSettings.from_environ({"OPENAI_API_KEY": "sk-very-secret"})
    assert settings.upstream_api_key.reveal() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)
    assert "sk-very-secret" not in str(settings.upstream_api_key)
    assert Secret("a") == Secret("a")


def test_broker_upstream_url_precedence() -> None:
    assert BrokerSettings.from_environ({}).upstream_base_url == "https://api.openai.com/v1"
    env = {"OPENAI_BASE_URL": "http://a/v1", "SWITCHBOARD_BROKER_UPSTREAM_URL": "http://b/v1"}
    assert BrokerSettings.from_environ(env).upstream_base_url == "http://b/v1"


def test_development_tenants_authenticate_only_configured_keys() -> None:
    key = new_key()
    directory = TenantDirectory.from_key_spec(f"acme={hash_key(key)}", {})
    tenant = directory.authenticate(key)
    assert tenant is not None and tenant.id == "acme"
    assert directory.authenticate(key + "x") is None
    with pytest.raises(ConfigError, match="SWITCHBOARD_TENANT_KEYS"):
        TenantDirectory.from_key_spec("acme=nothex", {})


@pytest.mark.parametrize(
    ("settings", "prefix", "default"),
    [
        (SessionSettings, "SWITCHBOARD_SESSION", "127.0.0.1:9101"),
        (BrokerSettings, "SWITCHBOARD_BROKER", "127.0.0.1:9102"),
        (ToolExecSettings, "SWITCHBOARD_TOOLEXEC", "127.0.0.1:9103"),
    ],
)
def test_the_metrics_endpoint_has_a_default_and_may_be_turned_off(
    settings: type[SessionSettings | BrokerSettings | ToolExecSettings], prefix: str, default: str
) -> None:
    variable = f"{prefix}_METRICS_LISTEN"
    assert settings.from_environ({}).metrics_listen == default
    assert settings.from_environ({variable: "0.0.0.0:9999"}).metrics_listen == "0.0.0.0:9999"
    assert settings.from_environ({variable: "off"}).metrics_listen == ""
    with pytest.raises(ConfigError, match=variable):
        settings.from_environ({variable: "nowhere"})
