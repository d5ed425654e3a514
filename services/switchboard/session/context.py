"""The context window sent to the model: the newest whole turns within a token budget.

Pure functions, no I/O: the service loads a session's items from Redis and hands
them here. There is no offline tokenizer for every model Switchboard may talk to,
so sizes are estimated: `ceil(chars / 4)` per text field (`switchboard.tokens`:
the usual rule of thumb for English text with OpenAI tokenizers) plus
`ITEM_OVERHEAD_TOKENS` per item for the role and framing tokens every chat
message carries.

Items are grouped into turns. A turn starts at a user message and runs up to the
next user message, so dropping whole turns never separates a `function_call` from
its `function_call_output` and never keeps a reply without its question. Items
before the first user message (a greeting, a system note) form a turn of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from switchboard.tokens import estimate_tokens
from switchboard.v1 import common_pb2

# Tokens every item costs beyond its text: role, separators and the message frame.
ITEM_OVERHEAD_TOKENS = 4


class ContextWindow(NamedTuple):
    """What `build_context` keeps: a plain 3-tuple `(items, estimated_tokens, dropped_items)`."""

    # The kept items, oldest first (the newest summary first, when there is one).
    items: list[common_pb2.Item]
    # Instructions plus kept items, in estimated tokens. Exceeds the budget only
    # when the newest turn alone does.
    estimated_tokens: int
    # How many of the oldest items were left out (summaries not counted).
    dropped_items: int


def instructions_tokens(instructions: str) -> int:
    """Estimated tokens of the instructions, sent as one system message (0 when empty)."""
    if not instructions:
        return 0
    return estimate_tokens(instructions) + ITEM_OVERHEAD_TOKENS


def item_tokens(item: common_pb2.Item) -> int:
    """Estimated tokens of one item: its text fields plus `ITEM_OVERHEAD_TOKENS`.

    Counts what reaches the model: content text, and a function call's name,
    arguments and call id, or a function call output's output and call id.
    """
    text_tokens = sum(estimate_tokens(part.text) for part in item.content)
    text_tokens += estimate_tokens(item.name) + estimate_tokens(item.arguments)
    text_tokens += estimate_tokens(item.output) + estimate_tokens(item.call_id)
    return text_tokens + ITEM_OVERHEAD_TOKENS


def is_user_message(item: common_pb2.Item) -> bool:
    return item.type == common_pb2.ITEM_TYPE_MESSAGE and item.role == common_pb2.ROLE_USER


def group_turns(items: Sequence[common_pb2.Item]) -> list[list[common_pb2.Item]]:
    """Split items (oldest first) into turns, each starting at a user message.

    Items before the first user message form the first turn. Concatenating the
    turns gives back `items` unchanged.
    """
    turns: list[list[common_pb2.Item]] = []
    for item in items:
        if not turns or is_user_message(item):
            turns.append([])
        turns[-1].append(item)
    return turns


def build_context(
    instructions: str, items: Sequence[common_pb2.Item], budget_tokens: int
) -> ContextWindow:
    """The window of `build_window`, without the items no summary covers."""
    return build_window(instructions, items, budget_tokens)[0]


def build_window(
    instructions: str, items: Sequence[common_pb2.Item], budget_tokens: int
) -> tuple[ContextWindow, list[common_pb2.Item]]:
    """Keep the newest whole turns whose estimated size fits `budget_tokens`.

    Instructions always count against the budget. Turns are taken newest first
    while they fit; the first turn that does not fit ends the window, so the kept
    items are always a contiguous, most recent run of the conversation. The newest
    turn is always kept, even when it alone exceeds the budget: the upstream then
    refuses the call with a clear error instead of the model answering nothing.

    Args:
        instructions: the session's instructions (may be empty).
        items: the conversation, oldest first.
        budget_tokens: the estimated-token budget for instructions plus items.

    A summary item (ITEM_TYPE_SUMMARY, stored right after the last item it
    covers) stands for everything before it: the newest summary comes first in
    the window and counts against the budget, the items it covers are left out,
    and turns are kept from those after it. Older summaries are never sent.

    Returns:
        The window (`items` oldest first), and the items it left out that no
        summary covers (oldest first): what a new summary should take in.
    """
    used = instructions_tokens(instructions)
    summary: common_pb2.Item | None = None
    rest: Sequence[common_pb2.Item] = items
    for index in range(len(items) - 1, -1, -1):
        if items[index].type == common_pb2.ITEM_TYPE_SUMMARY:
            summary, rest = items[index], items[index + 1 :]
            used += item_tokens(summary)
            break
    rest = [item for item in rest if item.type != common_pb2.ITEM_TYPE_SUMMARY]
    kept: list[list[common_pb2.Item]] = []
    for turn in reversed(group_turns(rest)):
        cost = sum(item_tokens(item) for item in turn)
        if kept and used + cost > budget_tokens:
            break
        kept.append(turn)
        used += cost
    window = [item for turn in reversed(kept) for item in turn]
    unsummarized = list(rest[: len(rest) - len(window)])
    summaries = sum(item.type == common_pb2.ITEM_TYPE_SUMMARY for item in items)
    dropped = len(items) - summaries - len(window)
    kept_items = ([summary] if summary else []) + window
    return ContextWindow(kept_items, used, dropped), unsummarized
