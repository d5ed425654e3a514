"""Key paths in error messages: one writer for tool arguments and configuration files."""

from __future__ import annotations

import pytest

from switchboard.key_paths import CONFIG_KEY, format_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((), ""),
        (("a",), "a"),
        (("a", 0, "b"), "a[0].b"),
        (("tenants", "acme", "webhooks", 2, "url"), "tenants.acme.webhooks[2].url"),
        (("a b", "acme.eu"), '["a b"]["acme.eu"]'),
        # JSON fields: only identifiers go bare.
        (("local-vllm", "2024"), '["local-vllm"]["2024"]'),
    ],
)
def test_format_path(path: tuple[str | int, ...], expected: str) -> None:
    assert format_path(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("upstreams", "local-vllm", "base_url"), "upstreams.local-vllm.base_url"),
        (("tiers", "2024"), "tiers.2024"),
        (("tenants", "acme", "models", "gpt-4.1"), 'tenants.acme.models["gpt-4.1"]'),
        (("tenants", "acme", "keys", 0), "tenants.acme.keys[0]"),
        (("-x",), '["-x"]'),
    ],
)
def test_configuration_keys_may_hold_dashes_and_lead_with_digits(
    path: tuple[str | int, ...], expected: str
) -> None:
    assert format_path(path, bare=CONFIG_KEY) == expected
