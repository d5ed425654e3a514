"""Moderation of a tenant's conversations: user messages before they are stored, and
the model's streamed text as it is generated (docs/moderation.md).

`Moderator.check_item` refuses a flagged user message with `input_flagged` (it
is never stored, so it never reaches the model). `Moderator.output` gives a
response's `OutputStream`, which the turn feeds the model's text deltas: it
checks them in overlapping windows (`output_guard.OutputGuard`) one check at a
time in the background, sends text only as the hold-back allows, and waits for
a check when it must. At the end of the stream the rest is checked, then the
whole text once more. A flagged window raises `ContentFiltered`; the turn then
closes the model call and ends the response `incomplete` with reason
`content_filter`. A check that cannot be made fails closed: the message is
refused, the response fails, with the broker's error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from switchboard.errors import SwitchboardError
from switchboard.gateway.backends import Backends
from switchboard.gateway.output_guard import OutputGuard, Window
from switchboard.telemetry.metrics import MetricFactory
from switchboard.tenancy import ModerationPolicy
from switchboard.tenancy.moderation_section import CATEGORIES
from switchboard.v1 import common_pb2

_C = common_pb2
# The category labels a flag may carry on metrics (OpenAI's); any other is "other".
KNOWN_CATEGORIES = CATEGORIES | {"flagged"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class InputFlagged(SwitchboardError):
    code = _C.ERROR_CODE_INPUT_FLAGGED


class ContentFiltered(Exception):
    """The model's output was flagged; `categories` blocked it."""

    def __init__(self, categories: list[str]) -> None:
        super().__init__(", ".join(categories))
        self.categories = categories


class ModerationMetrics:
    """Moderation checks, flags and the latency they add, in the gateway's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        metrics = MetricFactory("gateway", registry)
        self.registry = metrics.registry
        self.checks = metrics.counter(
            "moderation_checks_total",
            "Moderation checks, by what was checked (input, output, output_whole) and "
            "result (passed, flagged, error).",
            ["kind", "result"],
        )
        self.flags = metrics.counter(
            "moderation_flags_total",
            "Blocking categories of flagged checks, by kind and category.",
            ["kind", "category"],
        )
        self.check_duration = metrics.histogram(
            "moderation_check_duration_seconds",
            "Time one moderation check took, by kind.",
            ["kind"],
            buckets=_BUCKETS,
        )
        self.added_latency = metrics.histogram(
            "moderation_added_latency_seconds",
            "Time moderation added: per user message (input), per response from its "
            "first text to that text being sent (output_first_text), and from the end "
            "of the model's stream to the end of its last checks (output_end).",
            ["kind"],
            buckets=_BUCKETS,
        )


class Moderator:
    """The moderation of one session, by its tenant's policy."""

    def __init__(
        self,
        backends: Backends,
        tenant_id: str,
        session_id: str,
        policy: ModerationPolicy,
        metrics: ModerationMetrics,
    ) -> None:
        self.backends = backends
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.policy = policy
        self.metrics = metrics

    async def check(self, text: str, kind: str) -> list[str] | None:
        """The categories that block `text`, or None when it passes.

        Raises:
            SwitchboardError: the check could not be made.
        """
        started = time.monotonic()
        try:
            reply = await self.backends.moderate(
                self.tenant_id, self.session_id, [text], self.policy.timeout_s
            )
        except SwitchboardError:
            self.metrics.checks.labels(kind, "error").inc()
            raise
        finally:
            self.metrics.check_duration.labels(kind).observe(time.monotonic() - started)
        result = reply.results[0] if reply.results else None
        blocking = self.policy.blocks(result.flagged, list(result.categories)) if result else None
        self.metrics.checks.labels(kind, "flagged" if blocking else "passed").inc()
        for category in blocking or ():
            label = category if category in KNOWN_CATEGORIES else "other"
            self.metrics.flags.labels(kind, label).inc()
        return blocking

    async def check_item(self, item: common_pb2.Item) -> None:
        """Refuse a flagged user message (other items pass unchecked).

        Raises:
            InputFlagged: the message was flagged.
            SwitchboardError: the check could not be made (fail closed).
        """
        if not self.policy.checks_input:
            return
        if item.type != _C.ITEM_TYPE_MESSAGE or item.role != _C.ROLE_USER:
            return
        text = "\n".join(part.text for part in item.content)
        if not text.strip():
            return
        started = time.monotonic()
        blocking = await self.check(text, "input")
        self.metrics.added_latency.labels("input").observe(time.monotonic() - started)
        if blocking:
            raise InputFlagged(
                "The message was not accepted: the moderation policy flagged it "
                f"({', '.join(blocking[:5])}).",
                param="item.content",
            )

    def output(self, publish: Callable[[str], None]) -> OutputStream | None:
        """A response's output stream, or None when output is not moderated."""
        if not self.policy.checks_output:
            return None
        return OutputStream(self, publish)


class OutputStream:
    """The moderated text of one response: fed deltas, it sends what may be sent.

    The model's stream is never held up: deltas are taken as they come, one
    check runs at a time in the background over everything not yet checked
    (a full window, or less when the hold-back is used up), and text is sent as
    soon as its check passes. A flag or a failed check is raised by the next
    `feed` (or by `finish`), which makes the turn close the model call.

    Args:
        publish: sends released text to the client (the protocol's text delta).
    """

    def __init__(self, moderator: Moderator, publish: Callable[[str], None]) -> None:
        policy = moderator.policy
        self.moderator = moderator
        self.guard = OutputGuard(
            window_chars=policy.window_chars,
            overlap_chars=policy.overlap_chars,
            hold_back_chars=policy.hold_back_chars,
        )
        self._publish = publish
        self._check: asyncio.Task[None] | None = None
        self._final = False
        self._flagged: list[str] | None = None
        self._failed: SwitchboardError | None = None
        self._first_fed: float | None = None
        self._first_sent: float | None = None

    async def feed(self, delta: str) -> None:
        """One text delta of the model.

        Raises:
            ContentFiltered: a window was flagged.
            SwitchboardError: a check could not be made.
        """
        self._stop_if_stopped()
        if self._first_fed is None:
            self._first_fed = time.monotonic()
        self.guard.feed(delta)
        self._pump()

    async def finish(self) -> None:
        """The stream ended: check the rest, then the whole text, and send the rest.

        Raises:
            ContentFiltered, SwitchboardError: as `feed`.
        """
        self._final = True
        ended = time.monotonic()
        self._pump()
        while self._check is not None:
            await asyncio.wait([self._check])
            self._stop_if_stopped()
            self._pump()
        self._stop_if_stopped()
        if self.guard.length:
            blocking = await self.moderator.check(self.guard.text, "output_whole")
            if blocking:
                raise ContentFiltered(blocking)
        self._send()
        self.moderator.metrics.added_latency.labels("output_end").observe(time.monotonic() - ended)

    def close(self) -> None:
        """Stop a check still running (the response ended another way)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._first_fed is not None and self._first_sent is not None:
            added = self._first_sent - self._first_fed
            self.moderator.metrics.added_latency.labels("output_first_text").observe(added)

    def _stop_if_stopped(self) -> None:
        if self._flagged is not None:
            raise ContentFiltered(self._flagged)
        if self._failed is not None:
            raise self._failed

    def _pump(self) -> None:
        """Start the next check when one is due, and send what may be sent."""
        if self._check is None and self._flagged is None and self._failed is None:
            window = self.guard.window(final=self._final)
            if window is not None:
                self._check = asyncio.create_task(self._run(window))
        self._send()

    async def _run(self, window: Window) -> None:
        try:
            blocking = await self.moderator.check(window.text, "output")
        except SwitchboardError as exc:
            self._failed = exc
            self._check = None
            return
        self._check = None
        if blocking:
            self._flagged = blocking
            return
        self.guard.passed(window)
        self._pump()

    def _send(self) -> None:
        text = self.guard.release()
        if text:
            if self._first_sent is None:
                self._first_sent = time.monotonic()
            self._publish(text)
