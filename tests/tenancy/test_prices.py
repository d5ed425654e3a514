"""The `prices:` section and tenants' `money_budget`: checked, kept exact."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.config import ConfigError
from switchboard.limits.ledger import AudioTokens, cost_of, largest_cost
from switchboard.tenancy import TenantDirectory
from switchboard.tenancy.prices_section import Price
from switchboard.v1 import common_pb2
from tests.tenancy.documents import ENVIRON, EXAMPLE, document


def load(data: dict[str, Any]) -> TenantDirectory:
    return TenantDirectory.parse(data, ENVIRON)


def test_the_example_ships_dated_openai_prices() -> None:
    directory = TenantDirectory.load(EXAMPLE, ENVIRON)
    mini = directory.prices["gpt-4o-mini"]
    assert (mini.input, mini.cached_input, mini.output) == (150_000, 75_000, 600_000)
    assert all(price.as_of for price in directory.prices.values())
    budget = directory.tenants["acme"].money_budget
    assert budget is not None and budget.daily == 50 * 10**12


def test_prices_are_micro_dollars_per_million_and_costs_are_exact() -> None:
    data = document()
    data["prices"] = {"m": {"input": 0.15, "output": "0.6"}, "a": {"input": 3, "output": 1e-6}}
    prices = load(data).prices
    assert prices["m"] == Price(input=150_000, cached_input=150_000, output=600_000)
    assert prices["a"].output == 1
    usage = common_pb2.Usage(input_tokens=1234, cached_input_tokens=1000, output_tokens=77)
    # 234 x 0.15 + 1000 x 0.15 (cached defaults to input) + 77 x 0.6 micro-dollars.
    assert cost_of(usage, prices["m"]) == (1234 * 150_000 + 77 * 600_000)
    assert cost_of(usage, None) == 0
    assert largest_cost(10, 100, prices["m"]) == 10 * 150_000 + 100 * 600_000


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ({"m": {"output": 1}}, "prices.m.input: is required"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be between 0"),
        ({"m": {"input": "cheap", "output": 1}}, "prices.m.input: must be a number"),
        ({"m": {"input": 0.1234567, "output": 1}}, "prices.m.input: must have at most 6 decimals"),
        ({"m": {"input": 1, "output": 1, "currency": "EUR"}}, "prices.m"),
        ({"m": {"input": 1, "output": 1, "as_of": "last week"}}, "prices.m.as_of"),
        ({"m": {"input": True, "output": 1}}, "prices.m.input"),
    ],
)
def test_bad_prices_are_refused_naming_the_key(prices: Any, message: str) -> None:
    data = document()
    data["prices"] = prices
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load(data)


def test_a_bad_money_budget_is_refused() -> None:
    data = document()
    data["tenants"]["beta"]["money_budget"] = {"daily_usd": "lots"}
    with pytest.raises(ConfigError, match=r"tenants\.beta\.money_budget\.daily_usd"):
        load(data)
    data["tenants"]["beta"]["money_budget"] = {"weekly_usd": 3}
    with pytest.raises(ConfigError, match=r"tenants\.beta\.money_budget"):
        load(data)


def test_audio_tokens_are_priced_at_the_audio_prices_or_the_text_ones() -> None:
    data = document()
    data["prices"] = {
        "talk": {
            "input": 4,
            "cached_input": 0.4,
            "output": 16,
            "audio_input": 32,
            "cached_audio_input": 0.4,
            "audio_output": 64,
        },
        "plain": {"input": 4, "cached_input": 0.4, "output": 16},
        "spoken": {"input": 4, "output": 16, "audio_input": 32},
    }
    prices = load(data).prices
    # 1000 in (600 audio, of which 100 cached; 300 text cached), 200 out (150 audio).
    usage = common_pb2.Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)
    audio = AudioTokens(input=600, cached_input=100, output=150)
    text = 100 * 4_000_000 + 300 * 400_000 + 50 * 16_000_000
    assert cost_of(usage, prices["talk"], audio) == (
        text + 500 * 32_000_000 + 100 * 400_000 + 150 * 64_000_000
    )
    # Without audio prices, audio tokens cost what text tokens do.
    assert cost_of(usage, prices["plain"], audio) == cost_of(usage, prices["plain"])
    # Cached audio input defaults to the audio input price when that is listed.
    assert prices["spoken"].audio == (32_000_000, 32_000_000, 16_000_000)
    # A voice response reserves at the higher price of each direction.
    highest = prices["talk"].highest()
    assert (highest.input, highest.output) == (32_000_000, 64_000_000)
    assert largest_cost(10, 100, highest) == 10 * 32_000_000 + 100 * 64_000_000
