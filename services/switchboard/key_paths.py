"""Where in a parsed document a problem is, written for people.

A key path is a tuple of mapping keys and list indexes, outermost first:
`("tenants", "acme", "keys", 0)` reads `tenants.acme.keys[0]`. The tenants and
tools files (`switchboard.tenancy.yaml_checks`) and a tool call's JSON
arguments (`switchboard.toolexec.validation`) name fields this way in their
error messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

KeyPath = tuple[str | int, ...]

# Keys shown bare after a dot; any other key is shown quoted in brackets.
# JSON fields: identifiers, as in `order.items[2].sku`.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Configuration keys: also names such as `local-vllm` or `2024`.
CONFIG_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def format_path(path: Sequence[str | int], *, bare: re.Pattern[str] = IDENTIFIER) -> str:
    """The path for people: `order.items[2].sku`; other keys as `["a b"]` (JSON-quoted).

    Args:
        path: keys and indexes, outermost first; empty for the top level ('').
        bare: the keys written after a dot (whole match); the rest go in brackets.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif bare.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
    return text
