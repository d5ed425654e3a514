"""The simulator's `POST /v1/moderations`: deterministic verdicts from marker words.

A text is flagged in category C exactly when it contains the marker word
`sbflag-C` (lower case; C is one of OpenAI's moderation categories, e.g.
`sbflag-violence`, `sbflag-self-harm/intent`). Scores are 0.99 for a flagged
category and 0.001 otherwise. The chat side can put a marker in a reply with
the `flag` directive (docs/simulator.md), so output moderation can be tested
with text the user never typed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any, Final

import orjson
from aiohttp import web

MARKER_PREFIX: Final = "sbflag-"
CATEGORIES: Final = (
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
)
_MARKER = re.compile(r"sbflag-([a-z/-]+)")


def marker(category: str) -> str:
    """The word that makes the simulator flag `category`."""
    return MARKER_PREFIX + category


def verdict(text: str) -> dict[str, Any]:
    """One `results[]` entry of OpenAI's moderation response for `text`."""
    found = {match for match in _MARKER.findall(text.lower()) if match in CATEGORIES}
    return {
        "flagged": bool(found),
        "categories": {category: category in found for category in CATEGORIES},
        "category_scores": {
            category: 0.99 if category in found else 0.001 for category in CATEGORIES
        },
        "category_applied_input_types": {category: ["text"] for category in CATEGORIES},
    }


async def moderations(request: web.Request, *, delay_ms: int = 0) -> web.Response:
    """`POST /v1/moderations` with `input` as a string or a list of strings."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _bad("The body is not JSON.")
    raw = body.get("input") if isinstance(body, dict) else None
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return _bad("'input' must be a string or a non-empty list of strings.")
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    digest = hashlib.sha256(orjson.dumps(texts)).hexdigest()[:24]
    answer = {
        "id": f"modr-{digest}",
        "model": str(body.get("model") or "omni-moderation-latest"),
        "results": [verdict(text) for text in texts],
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def _bad(message: str) -> web.Response:
    error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.Response(body=orjson.dumps(error), status=400, content_type="application/json")
