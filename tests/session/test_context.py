"""Context-window building: pure functions, fed hand-made items."""

from __future__ import annotations

from switchboard.session.context import (
    ITEM_OVERHEAD_TOKENS,
    build_context,
    group_turns,
    instructions_tokens,
    item_tokens,
)
from switchboard.v1 import common_pb2

C = common_pb2


def user(item_id: str, text: str = "") -> C.Item:
    return C.Item(
        id=item_id,
        type=C.ITEM_TYPE_MESSAGE,
        role=C.ROLE_USER,
        content=[C.ContentPart(type=C.CONTENT_TYPE_INPUT_TEXT, text=text)],
    )


def assistant(item_id: str, text: str = "") -> C.Item:
    return C.Item(
        id=item_id,
        type=C.ITEM_TYPE_MESSAGE,
        role=C.ROLE_ASSISTANT,
        content=[C.ContentPart(type=C.CONTENT_TYPE_OUTPUT_TEXT, text=text)],
    )


def call(item_id: str, call_id: str = "") -> C.Item:
    return C.Item(id=item_id, type=C.ITEM_TYPE_FUNCTION_CALL, call_id=call_id, name="")


def output(item_id: str, call_id: str = "") -> C.Item:
    return C.Item(id=item_id, type=C.ITEM_TYPE_FUNCTION_CALL_OUTPUT, call_id=call_id)


def ids(items: list[C.Item]) -> list[str]:
    return [item.id for item in items]


def test_item_tokens_count_every_text_field_plus_overhead() -> None:
    assert item_tokens(user("u", "")) == ITEM_OVERHEAD_TOKENS
    assert item_tokens(user("u", "12345678")) == 2 + ITEM_OVERHEAD_TOKENS
    function_call = C.Item(
        type=C.ITEM_TYPE_FUNCTION_CALL, call_id="c1", name="weather", arguments='{"c":"x"}'
    )
    # call_id 1 + name 2 + arguments 3 (9 chars)
    assert item_tokens(function_call) == 1 + 2 + 3 + ITEM_OVERHEAD_TOKENS
    result = C.Item(type=C.ITEM_TYPE_FUNCTION_CALL_OUTPUT, call_id="c1", output="sunny")
    assert item_tokens(result) == 1 + 2 + ITEM_OVERHEAD_TOKENS


def test_instructions_cost_nothing_when_empty_and_one_message_otherwise() -> None:
    assert instructions_tokens("") == 0
    assert instructions_tokens("be brief") == 2 + ITEM_OVERHEAD_TOKENS


def test_turns_start_at_user_messages_and_leading_items_form_their_own() -> None:
    items = [
        assistant("greet"),
        user("u1"),
        assistant("a1"),
        user("u2"),
        call("c2", "x"),
        output("o2", "x"),
        assistant("a2"),
    ]
    turns = group_turns(items)
    assert [ids(turn) for turn in turns] == [
        ["greet"],
        ["u1", "a1"],
        ["u2", "c2", "o2", "a2"],
    ]
    assert [item for turn in turns for item in turn] == items


def test_everything_fits_exactly_at_the_budget() -> None:
    items = [user("u1"), assistant("a1"), user("u2"), assistant("a2")]
    exact = 4 * ITEM_OVERHEAD_TOKENS
    window = build_context("", items, exact)
    assert ids(window.items) == ["u1", "a1", "u2", "a2"]
    assert window.estimated_tokens == exact
    assert window.dropped_items == 0


def test_one_token_short_drops_the_oldest_whole_turn() -> None:
    items = [user("u1"), assistant("a1"), user("u2"), assistant("a2")]
    window = build_context("", items, 4 * ITEM_OVERHEAD_TOKENS - 1)
    assert ids(window.items) == ["u2", "a2"]
    assert window.estimated_tokens == 2 * ITEM_OVERHEAD_TOKENS
    assert window.dropped_items == 2


def test_instructions_count_against_the_budget() -> None:
    items = [user("u1"), assistant("a1"), user("u2"), assistant("a2")]
    instructions = "x" * 8  # 2 tokens + overhead
    budget = 4 * ITEM_OVERHEAD_TOKENS
    window = build_context(instructions, items, budget)
    assert ids(window.items) == ["u2", "a2"]
    assert window.estimated_tokens == instructions_tokens(instructions) + 2 * ITEM_OVERHEAD_TOKENS
    assert build_context(instructions, items, budget + 6).dropped_items == 0


def test_a_function_call_is_never_separated_from_its_output() -> None:
    items = [
        user("u1", "x" * 40),
        call("c1", "k"),
        output("o1", "k"),
        assistant("a1"),
        user("u2"),
        call("c2", "m"),
        output("o2", "m"),
        assistant("a2"),
    ]
    newest_turn = sum(item_tokens(item) for item in items[4:])
    # Room for the newest turn plus the older turn's output and reply, not its call.
    window = build_context("", items, newest_turn + item_tokens(items[2]) + item_tokens(items[3]))
    assert ids(window.items) == ["u2", "c2", "o2", "a2"]
    assert window.dropped_items == 4


def test_a_reply_is_never_kept_without_its_question() -> None:
    items = [user("u1", "q" * 400), assistant("a1", "short"), user("u2", "hi")]
    window = build_context("", items, item_tokens(items[2]) + item_tokens(items[1]))
    assert ids(window.items) == ["u2"]
    assert window.dropped_items == 2


def test_the_newest_turn_is_kept_even_over_budget() -> None:
    items = [user("u1"), assistant("a1"), user("u2", "y" * 4000), call("c2"), output("o2")]
    window = build_context("be brief", items, 64)
    assert ids(window.items) == ["u2", "c2", "o2"]
    assert window.estimated_tokens > 64
    assert window.dropped_items == 2


def test_kept_turns_are_contiguous_even_when_an_older_small_turn_would_fit() -> None:
    items = [user("u1"), user("u2", "z" * 400), user("u3")]
    window = build_context("", items, 2 * ITEM_OVERHEAD_TOKENS + 1)
    assert ids(window.items) == ["u3"]
    assert window.dropped_items == 2


def test_no_items_costs_only_the_instructions() -> None:
    window = build_context("hello", [], 100)
    assert window == ([], instructions_tokens("hello"), 0)


def test_zero_budget_still_keeps_the_newest_turn() -> None:
    items = [assistant("greet"), user("u1"), assistant("a1")]
    kept, estimated, dropped = build_context("", items, 0)
    assert ids(kept) == ["u1", "a1"]
    assert estimated == 2 * ITEM_OVERHEAD_TOKENS
    assert dropped == 1


def summary(item_id: str, through: str, text: str) -> C.Item:
    return C.Item(
        id=item_id,
        type=C.ITEM_TYPE_SUMMARY,
        role=C.ROLE_SYSTEM,
        content=[C.ContentPart(type=C.CONTENT_TYPE_OUTPUT_TEXT, text=text)],
        summarized_through=through,
    )


def test_the_newest_summary_stands_for_the_items_before_it() -> None:
    from switchboard.session.context import build_window

    items = [
        user("u1", "first " * 20),
        assistant("a1", "reply " * 20),
        summary("s1", "a1", "old summary"),
        user("u2", "second " * 20),
        assistant("a2", "reply " * 20),
        summary("s2", "a2", "newer summary"),
        user("u3", "third " * 20),
        assistant("a3", "reply " * 20),
        user("u4", "fourth"),
    ]
    budget = sum(item_tokens(item) for item in items[5:])
    window, unsummarized = build_window("", items, budget)
    assert [item.id for item in window.items] == ["s2", "u3", "a3", "u4"]
    assert window.dropped_items == 4 and unsummarized == []
    # A smaller budget drops turns after the summary: those need a new summary.
    window, unsummarized = build_window("", items, budget - 1)
    assert [item.id for item in window.items] == ["s2", "u4"]
    assert [item.id for item in unsummarized] == ["u3", "a3"]
    # Without summaries, the dropped items are all unsummarized.
    plain = [item for item in items if item.type != C.ITEM_TYPE_SUMMARY]
    window, unsummarized = build_window("", plain, item_tokens(plain[-1]))
    assert [item.id for item in window.items] == ["u4"]
    assert len(unsummarized) == 6
