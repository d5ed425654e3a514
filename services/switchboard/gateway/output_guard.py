"""Which streamed text may reach the client, given what moderation has checked (no I/O).

The model's text accumulates here as it streams. It is checked in windows: a
window is the text not yet checked (`window_chars` of it, or less when the
stream waits for it or has ended) preceded by the last `overlap_chars` of text
already checked. Because every window repeats the end of the one before, any
phrase of at most `overlap_chars + 1` characters lies whole inside one window,
wherever the boundaries fall: a flagged phrase cannot slip through by being cut
in two. Windows are checked one at a time, in order, so "checked" is always a
prefix of the text.

`hold_back_chars` is how far the text sent may run ahead of the checked prefix:
the client sees at most that much unchecked text. At 0 only checked text is
sent, and each window's check is on the path of the text it covers (the first
text waits for the first check: time to first token grows by a check's
latency); a larger hold-back lets text flow while checks run behind it, at the
price of that much text that may later turn out to be flagged
(docs/moderation.md measures the trade-off).

Call order: `feed()` each delta; `window()` gives the next window to check
(or None); report a clean verdict with `passed()`; `release()` gives the text that
may be sent now; `blocked` says the stream must wait for a check before more
can be sent. At the end, `window(final=True)` until None, then `release()`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """A span of text to check: `text` ends at `end` (the checked prefix after it)."""

    end: int
    text: str


class OutputGuard:
    def __init__(self, *, window_chars: int, overlap_chars: int, hold_back_chars: int) -> None:
        self.window_chars = window_chars
        self.overlap_chars = overlap_chars
        self.hold_back_chars = hold_back_chars
        self._parts: list[str] = []
        self._length = 0
        self._text = ""
        self.sent = 0  # characters released to the client
        self.checked = 0  # the prefix checked clean
        self._asked = 0  # the end of the last window handed out

    @property
    def text(self) -> str:
        if len(self._text) != self._length:
            self._text = "".join(self._parts)
        return self._text

    @property
    def length(self) -> int:
        return self._length

    @property
    def in_flight(self) -> bool:
        """A window was handed out and its verdict not reported yet."""
        return self._asked > self.checked

    @property
    def blocked(self) -> bool:
        """Text waits that the hold-back does not let through before a check."""
        return self._length > self.checked + self.hold_back_chars

    def feed(self, delta: str) -> None:
        self._parts.append(delta)
        self._length += len(delta)

    def window(self, *, final: bool = False) -> Window | None:
        """The next window to check, when one is due and none is in flight: a full
        one, or what there is when the stream is blocked or has ended (`final`)."""
        if self.in_flight or self._asked >= self._length:
            return None
        unchecked = self._length - self._asked
        if unchecked < self.window_chars and not final and not self.blocked:
            return None
        end = self._length if unchecked <= self.window_chars else self._asked + self.window_chars
        start = max(0, self._asked - self.overlap_chars)
        self._asked = end
        return Window(end, self.text[start:end])

    def passed(self, window: Window) -> None:
        """`window` passed its check."""
        self.checked = max(self.checked, window.end)

    def release(self) -> str:
        """The text that may be sent now (and counts it as sent)."""
        limit = min(self._length, self.checked + self.hold_back_chars)
        if limit <= self.sent:
            return ""
        out = self.text[self.sent : limit]
        self.sent = limit
        return out
