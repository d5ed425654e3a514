"""Moderation of streamed output: the pure window logic, and the stream driving real
asyncio tasks against the in-memory backends (which flag `sbflag-<category>`)."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.gateway.moderation import (
    ContentFiltered,
    InputFlagged,
    ModerationMetrics,
    Moderator,
)
from switchboard.gateway.output_guard import OutputGuard
from switchboard.gateway.testing.backends import MemoryBackends
from switchboard.tenancy import ModerationPolicy
from switchboard.v1 import common_pb2

PHRASE = "sbflag-violence"


def windows_of(text: str, *, window: int, overlap: int, chunk: int) -> list[str]:
    """Every window a guard hands out for `text` fed in `chunk`-sized deltas, all passing."""
    guard = OutputGuard(window_chars=window, overlap_chars=overlap, hold_back_chars=10**6)
    seen = []
    for start in range(0, len(text), chunk):
        guard.feed(text[start : start + chunk])
        while (found := guard.window()) is not None:
            seen.append(found.text)
            guard.passed(found)
    while (found := guard.window(final=True)) is not None:
        seen.append(found.text)
        guard.passed(found)
    assert guard.checked == len(text)
    return seen


@pytest.mark.parametrize("chunk", [1, 3, 7, 40])
def test_a_phrase_cut_by_any_window_boundary_is_seen_whole(chunk: int) -> None:
    # Overlap 14 covers a 15-character phrase wherever the windows cut the text.
    for position in range(0, 60):
        text = "a" * position + PHRASE + "b" * 40
        seen = windows_of(text, window=10, overlap=len(PHRASE) - 1, chunk=chunk)
        assert any(PHRASE in window for window in seen), (position, chunk)


def test_without_enough_overlap_a_cut_phrase_would_slip_through() -> None:
    # The test above can fail: with no overlap, some cut hides the phrase.
    missed = [
        position
        for position in range(0, 30)
        if not any(
            PHRASE in window
            for window in windows_of(
                "a" * position + PHRASE + "b" * 40, window=10, overlap=0, chunk=1
            )
        )
    ]
    assert missed


def test_the_client_never_gets_more_than_the_hold_back_ahead_of_the_checks() -> None:
    guard = OutputGuard(window_chars=8, overlap_chars=4, hold_back_chars=5)
    guard.feed("0123456789abcdef")
    assert guard.release() == "01234"  # nothing checked yet: the hold-back only
    assert guard.blocked
    window = guard.window()
    assert window is not None and window.text == "01234567"
    assert guard.window() is None  # one check at a time
    guard.passed(window)
    assert guard.release() == "56789abc"  # checked 8, plus 5
    zero = OutputGuard(window_chars=8, overlap_chars=4, hold_back_chars=0)
    zero.feed("abc")
    assert zero.release() == ""
    assert zero.blocked  # so the stream asks for a short window at once
    short = zero.window()
    assert short is not None and short.text == "abc"


def moderator(policy: ModerationPolicy) -> tuple[Moderator, MemoryBackends]:
    backends = MemoryBackends()
    return Moderator(backends, "acme", "sess_1", policy, ModerationMetrics()), backends


def user(text: str) -> common_pb2.Item:
    return common_pb2.Item(
        type=common_pb2.ITEM_TYPE_MESSAGE,
        role=common_pb2.ROLE_USER,
        content=[common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text=text)],
    )


async def test_input_is_checked_only_when_the_policy_says_so() -> None:
    checked, backends = moderator(ModerationPolicy(mode="input"))
    await checked.check_item(user("hello"))
    with pytest.raises(InputFlagged) as caught:
        await checked.check_item(user(f"I say {PHRASE}"))
    assert caught.value.name == "input_flagged" and caught.value.param == "item.content"
    assert "violence" in caught.value.message
    off, quiet = moderator(ModerationPolicy(mode="off"))
    await off.check_item(user(f"I say {PHRASE}"))
    assert quiet.moderated == [] and len(backends.moderated) == 2
    only_hate, _ = moderator(ModerationPolicy(mode="input", categories=("hate",)))
    await only_hate.check_item(user(f"I say {PHRASE}"))  # violence does not block here
    registry = checked.metrics.registry
    flagged = {"kind": "input", "result": "flagged"}
    assert registry.get_sample_value("switchboard_gateway_moderation_checks_total", flagged) == 1
    violence = {"kind": "input", "category": "violence"}
    assert registry.get_sample_value("switchboard_gateway_moderation_flags_total", violence) == 1


async def run_stream(policy: ModerationPolicy, deltas: list[str]) -> tuple[str, Exception | None]:
    checked, _ = moderator(policy)
    sent: list[str] = []
    stream = checked.output(sent.append)
    assert stream is not None
    error: Exception | None = None
    try:
        for delta in deltas:
            await stream.feed(delta)
            await asyncio.sleep(0)
        await stream.finish()
    except ContentFiltered as exc:
        error = exc
    finally:
        stream.close()
    return "".join(sent), error


async def test_clean_output_is_all_sent() -> None:
    policy = ModerationPolicy(mode="input_output", window_chars=10, overlap_chars=5)
    words = [f"word{i} " for i in range(30)]
    sent, error = await run_stream(policy, words)
    assert error is None and sent == "".join(words)


@pytest.mark.parametrize("hold_back", [0, 6, 30])
async def test_flagged_output_stops_with_at_most_the_hold_back_unchecked(hold_back: int) -> None:
    policy = ModerationPolicy(
        mode="input_output", window_chars=12, overlap_chars=20, hold_back_chars=hold_back
    )
    before = "clean text " * 5
    deltas = [part + " " for part in before.split(" ")] + ["sbflag-", "violence", " more"]
    sent, error = await run_stream(policy, deltas)
    assert isinstance(error, ContentFiltered) and error.categories == ["violence"]
    full = "".join(deltas)
    assert full.startswith(sent)
    # No window that held the whole phrase passed, so the checked prefix ends before
    # the phrase does, and the client got at most the hold-back beyond it.
    phrase_end = full.index(PHRASE) + len(PHRASE)
    assert len(sent) <= phrase_end - 1 + hold_back
    if hold_back == 0:
        assert PHRASE not in sent
