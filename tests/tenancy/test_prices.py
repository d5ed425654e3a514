"""The `prices:` section and tenants' `money_budget`: checked, kept exact."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.config import ConfigError
from switchboard.limits.ledger import cost_of, largest_cost
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
