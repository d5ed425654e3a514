"""The broker's settings for held calls (`BrokerSettings`): defaults, derivation, validation.

The rest of the settings are covered by tests/test_config.py.
"""

from __future__ import annotations

import pytest

from switchboard.config import BrokerSettings, ConfigError


def test_the_held_call_defaults() -> None:
    settings = BrokerSettings.from_environ({})
    assert settings.orphan_grace_s == 60.0
    assert settings.attach_max_bytes == 4 * 1024 * 1024
    # The default listen address, 127.0.0.1:50052, is one others on the host can dial.
    assert settings.advertise_address == "127.0.0.1:50052"


@pytest.mark.parametrize(
    ("listen", "advertised"),
    [
        ("10.0.0.7:50052", "10.0.0.7:50052"),
        ("broker-0.broker:50052", "broker-0.broker:50052"),
        ("0.0.0.0:50052", ""),
        ("[::]:50052", ""),
        (":::50052", ""),
        ("127.0.0.1:0", ""),
    ],
)
def test_the_advertised_address_defaults_to_a_concrete_listen_address(
    listen: str, advertised: str
) -> None:
    settings = BrokerSettings.from_environ({"SWITCHBOARD_BROKER_LISTEN": listen})
    assert settings.advertise_address == advertised


def test_the_advertised_address_setting_wins() -> None:
    environ = {
        "SWITCHBOARD_BROKER_LISTEN": "0.0.0.0:50052",
        "SWITCHBOARD_BROKER_ADVERTISE_ADDRESS": "10.1.2.3:50052",
        "SWITCHBOARD_BROKER_ORPHAN_GRACE_S": "0.5",
        "SWITCHBOARD_BROKER_ATTACH_MAX_BYTES": "1024",
    }
    settings = BrokerSettings.from_environ(environ)
    assert settings.advertise_address == "10.1.2.3:50052"
    assert (settings.orphan_grace_s, settings.attach_max_bytes) == (0.5, 1024)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SWITCHBOARD_BROKER_ADVERTISE_ADDRESS", "no-port"),
        ("SWITCHBOARD_BROKER_ORPHAN_GRACE_S", "-1"),
        ("SWITCHBOARD_BROKER_ORPHAN_GRACE_S", "soon"),
        ("SWITCHBOARD_BROKER_ATTACH_MAX_BYTES", "-5"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        BrokerSettings.from_environ({variable: value})
