"""The `moderation:` section of a tenant: whether and how its text is checked.

`mode` is `off` (the default), `input` (each user message is checked before it
is stored; a flagged one is refused and never reaches the model) or
`input_output` (the model's streamed text is checked too, in overlapping windows
as it is generated and once whole at the end; see docs/moderation.md). The
checks go to an OpenAI-compatible `/v1/moderations` (`upstream`, `model`)
through the broker. `categories` lists the categories that block; without it,
the upstream's own `flagged` verdict decides.

Errors are one `ConfigError("<key path>: <problem>")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from switchboard.key_paths import KeyPath
from switchboard.tenancy.yaml_checks import count, error, mapping, seconds, sequence, string

MODES = ("off", "input", "input_output")
# OpenAI's moderation categories: the names `categories` may list.
CATEGORIES = frozenset(
    {
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    }
)
MAX_WINDOW_CHARS = 16_384
MAX_TIMEOUT_S = 30.0

_KEYS = (
    "mode",
    "categories",
    "upstream",
    "model",
    "window_chars",
    "overlap_chars",
    "hold_back_chars",
    "timeout_s",
)


@dataclass(frozen=True, slots=True)
class ModerationPolicy:
    """How one tenant's text is moderated.

    Attributes:
        mode: off, input, or input_output.
        categories: the categories that block; None: the upstream's `flagged`.
        upstream: the upstream (of `upstreams:`) that serves `/v1/moderations`.
        model: the moderation model sent to it.
        window_chars: new output text checked per call (once this much is unchecked).
        overlap_chars: text already checked that each window repeats before its
            new text, so a phrase of up to this length split by a window
            boundary is still seen whole by one check.
        hold_back_chars: output text the client may receive before it is
            checked; 0 sends only checked text.
        timeout_s: longest one check may take; a check that fails or times out
            fails closed (the message is refused, the response stops).
    """

    mode: str = "off"
    categories: tuple[str, ...] | None = None
    upstream: str = "default"
    model: str = "omni-moderation-latest"
    window_chars: int = 400
    overlap_chars: int = 100
    hold_back_chars: int = 200
    timeout_s: float = 5.0

    @property
    def checks_input(self) -> bool:
        return self.mode in ("input", "input_output")

    @property
    def checks_output(self) -> bool:
        return self.mode == "input_output"

    def blocks(self, flagged: bool, categories: list[str]) -> list[str] | None:
        """The categories that block this verdict (["flagged"] when the upstream
        flagged it and no categories are configured), or None when it passes."""
        if self.categories is None:
            return (categories or ["flagged"]) if flagged else None
        hits = [category for category in categories if category in self.categories]
        return hits or None


_DEFAULT = ModerationPolicy()


def parse_moderation(raw: Any, path: KeyPath, upstreams: Mapping[str, Any]) -> ModerationPolicy:
    """A tenant's `moderation:` mapping (off when absent).

    Raises:
        ConfigError: `<key path>: <problem>` for the first problem found.
    """
    if raw is None:
        return ModerationPolicy()
    fields = mapping(raw, path, _KEYS)
    mode = fields.get("mode", "off")
    if mode is False:
        mode = "off"  # YAML 1.1 reads an unquoted `off` as false
    if mode not in MODES:
        raise error((*path, "mode"), "must be one of: off, input, input_output")
    categories = None
    if fields.get("categories") is not None:
        names: list[str] = []
        for index, item in enumerate(sequence(fields["categories"], (*path, "categories"))):
            name = string(item, (*path, "categories", index))
            if name not in CATEGORIES:
                raise error(
                    (*path, "categories", index),
                    "must be one of OpenAI's moderation categories: "
                    + ", ".join(sorted(CATEGORIES)),
                )
            names.append(name)
        if not names:
            raise error((*path, "categories"), "must list at least one category (or be left out)")
        categories = tuple(names)
    upstream = string(fields.get("upstream", "default"), (*path, "upstream"))
    if upstream not in upstreams:
        known = ", ".join(sorted(upstreams))
        raise error((*path, "upstream"), f"no upstream named {upstream[:64]!r} (defined: {known})")
    model = string(fields.get("model", _DEFAULT.model), (*path, "model"))
    window = _chars(fields, "window_chars", path, _DEFAULT.window_chars, minimum=1)
    overlap = _chars(fields, "overlap_chars", path, _DEFAULT.overlap_chars, minimum=0)
    hold = _chars(fields, "hold_back_chars", path, _DEFAULT.hold_back_chars, minimum=0)
    timeout = seconds(fields.get("timeout_s"), (*path, "timeout_s"))
    if timeout is not None and timeout > MAX_TIMEOUT_S:
        raise error((*path, "timeout_s"), f"must be at most {MAX_TIMEOUT_S:.0f} seconds")
    return ModerationPolicy(
        mode=str(mode),
        categories=categories,
        upstream=upstream,
        model=model,
        window_chars=window,
        overlap_chars=overlap,
        hold_back_chars=hold,
        timeout_s=timeout if timeout is not None else _DEFAULT.timeout_s,
    )


def _chars(
    fields: Mapping[str, Any], key: str, path: KeyPath, default: int, *, minimum: int
) -> int:
    raw = fields.get(key)
    if raw is None:
        return default
    if minimum == 0 and raw == 0:
        return 0
    value = count(raw, (*path, key))
    assert value is not None
    if value > MAX_WINDOW_CHARS:
        raise error((*path, key), f"must be at most {MAX_WINDOW_CHARS}")
    return value
