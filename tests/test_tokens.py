"""Token estimates from characters: ceil(chars / 4), for texts and counts alike."""

from __future__ import annotations

import pytest

from switchboard.tokens import estimate_tokens, estimated_usage


@pytest.mark.parametrize(
    ("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)]
)
def test_estimate_tokens_is_ceil_of_chars_over_four(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens
    assert estimate_tokens(len(text)) == tokens


def test_an_estimated_usage_sets_every_count() -> None:
    usage = estimated_usage(input_tokens=12, output_chars=9)
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 3, 15)
    assert usage.estimated
    assert usage.cached_input_tokens == 0
