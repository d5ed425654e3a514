"""The `summaries:` section of a tenant: summarising old turns instead of dropping them.

When a session's context no longer fits `context_tokens`, the gateway has the
old turns summarised by `model` (one of the tenant's models; pick a cheap one)
in the background, and stores the summary as a conversation item; later
contexts send the summary (at most `summary_tokens`) and the recent turns that
fit the rest of the budget. A turn waits at most `wait_s` for a summary, then
goes on dropping whole turns (docs/session.md#summaries).

Errors are one `ConfigError("<key path>: <problem>")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from switchboard.key_paths import KeyPath
from switchboard.tenancy.yaml_checks import count, error, mapping, seconds, string

_KEYS = ("enabled", "model", "context_tokens", "summary_tokens", "wait_s")
MAX_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class SummaryPolicy:
    """How one tenant's long conversations are summarised.

    Attributes:
        enabled: summarise (True) or only drop old turns (False, the default).
        model: the model that writes summaries (one of the tenant's models).
        context_tokens: the context budget of the tenant's sessions, summaries
            on or off (0: the session service's default).
        summary_tokens: the most a summary may take of that budget.
        wait_s: the longest a turn waits for a summary being written.
    """

    enabled: bool = False
    model: str = ""
    context_tokens: int = 0
    summary_tokens: int = 500
    wait_s: float = 2.0


def parse_summaries(raw: Any, path: KeyPath, models: Mapping[str, Any]) -> SummaryPolicy:
    """A tenant's `summaries:` mapping (disabled when absent).

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        return SummaryPolicy()
    fields = mapping(raw, path, _KEYS)
    enabled = fields.get("enabled", False)
    if not isinstance(enabled, bool):
        raise error((*path, "enabled"), "must be true or false")
    model = ""
    if enabled or "model" in fields:
        model = string(fields.get("model"), (*path, "model"))
        if model not in models:
            raise error((*path, "model"), "must be one of this tenant's models")
    context = count(fields.get("context_tokens"), (*path, "context_tokens")) or 0
    summary = count(fields.get("summary_tokens"), (*path, "summary_tokens")) or 500
    if enabled and context and summary >= context:
        raise error((*path, "summary_tokens"), "must be less than context_tokens")
    wait = seconds(fields.get("wait_s"), (*path, "wait_s"))
    if wait is not None and wait > MAX_WAIT_S:
        raise error((*path, "wait_s"), f"must be at most {MAX_WAIT_S:.0f} seconds")
    return SummaryPolicy(
        enabled=enabled,
        model=model,
        context_tokens=context,
        summary_tokens=summary,
        wait_s=wait if wait is not None else 2.0,
    )
