"""The `prices:` section of the tenants file: what each upstream model costs.

Prices are US dollars per million tokens, by the model name the upstream bills
(a route's `upstream_model`, or the model's own name), for input, cached input,
output, and audio input, cached audio input and output (docs/tenants.md#prices).
The gateway counts each response's cost from its usage with them.

A price is kept as an integer number of micro-dollars per million tokens
(at most six decimals are accepted), so a cost is an exact integer of
pico-dollars: tokens x micro-dollars per million.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from switchboard.key_paths import KeyPath
from switchboard.tenancy.tenants import MoneyBudget
from switchboard.tenancy.yaml_checks import error, mapping, string

MODEL = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")
# A million dollars per million tokens: far above any price, below int64 overflow
# for any realistic day of tokens.
MAX_PRICE = Decimal(1_000_000)
_PRICE_KEYS = (
    "input",
    "cached_input",
    "output",
    "audio_input",
    "cached_audio_input",
    "audio_output",
)
_ENTRY_KEYS = (*_PRICE_KEYS, "as_of")
_AS_OF = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, in micro-dollars per million tokens (USD/M x 10^6).

    `cached_input` defaults to `input`. The audio prices price a Realtime
    response's audio tokens; None (not listed) means the text price of the same
    kind (`cached_audio_input` defaults to `audio_input` when that is listed).
    """

    input: int
    cached_input: int
    output: int
    audio_input: int | None = None
    cached_audio_input: int | None = None
    audio_output: int | None = None
    # The date the prices were taken (YYYY-MM-DD), or "".
    as_of: str = ""

    @property
    def audio(self) -> tuple[int, int, int]:
        """Audio input, cached audio input and audio output, text prices filling in."""
        audio_input = self.input if self.audio_input is None else self.audio_input
        cached = self.cached_input if self.cached_audio_input is None else self.cached_audio_input
        audio_output = self.output if self.audio_output is None else self.audio_output
        return audio_input, cached, audio_output

    def highest(self) -> Price:
        """Per direction, the higher of the text and audio prices: what a response
        that may speak or write reserves of a money budget."""
        audio_input, _, audio_output = self.audio
        return Price(
            input=max(self.input, audio_input),
            cached_input=self.cached_input,
            output=max(self.output, audio_output),
            as_of=self.as_of,
        )


def parse_prices(raw: Any) -> dict[str, Price]:
    """The `prices:` mapping: each upstream model's prices.

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        return {}
    prices: dict[str, Price] = {}
    for model, body in mapping(raw, ("prices",)).items():
        if not isinstance(model, str) or not MODEL.fullmatch(model):
            raise error(("prices", str(model)[:64]), "model names are 1-256 printable characters")
        path: KeyPath = ("prices", model)
        fields = mapping(body, path, _ENTRY_KEYS)
        for required in ("input", "output"):
            if required not in fields:
                raise error((*path, required), "is required (US dollars per million tokens)")
        values = {key: _price(fields[key], (*path, key)) for key in _PRICE_KEYS if key in fields}
        as_of = ""
        if "as_of" in fields:
            as_of = string(str(fields["as_of"]), (*path, "as_of"))
            if not _AS_OF.fullmatch(as_of):
                raise error((*path, "as_of"), "must be a date, YYYY-MM-DD")
        prices[model] = Price(
            input=values["input"],
            cached_input=values.get("cached_input", values["input"]),
            output=values["output"],
            audio_input=values.get("audio_input"),
            cached_audio_input=values.get("cached_audio_input", values.get("audio_input")),
            audio_output=values.get("audio_output"),
            as_of=as_of,
        )
    return prices


def parse_money_budget(raw: Any, path: KeyPath) -> MoneyBudget | None:
    """A tenant's `money_budget: {daily_usd, monthly_usd}` (either may be absent).

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        return None
    fields = mapping(raw, path, ("daily_usd", "monthly_usd"))
    budgets = {}
    for key in ("daily_usd", "monthly_usd"):
        if fields.get(key) is not None:
            # US dollars, kept as pico-dollars as costs are.
            budgets[key] = _price(fields[key], (*path, key), "US dollars") * 1_000_000
    return MoneyBudget(daily=budgets.get("daily_usd"), monthly=budgets.get("monthly_usd"))


def _price(raw: Any, path: KeyPath, unit: str = "US dollars per million tokens") -> int:
    """An amount of `unit` (US dollars per million tokens), in millionths."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise error(path, f"must be a number of {unit}")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise error(path, f"must be a number of {unit}") from None
    if not value.is_finite() or not 0 <= value <= MAX_PRICE:
        raise error(path, f"must be between 0 and {MAX_PRICE} {unit}")
    micro = value * 1_000_000
    if micro != micro.to_integral_value():
        raise error(path, "must have at most 6 decimals")
    return int(micro)
