"""An upstream `response.output_audio.delta` read without parsing its audio (pure, no I/O).

Audio deltas are most of what a voice session receives (fifty or more a
second, each a few KiB of base64), and of one the gateway needs only its
`event_id` (the resume's numbering), its `response_id` (admission, time to
first audio) and the length of its `delta` (audio seconds). `read` finds
those in the raw bytes, as the broker forwards them, instead of decoding the
whole event into Python objects and then encoding it again for the client.

It reads only an event laid out as OpenAI and the simulator send it: the
`type` first, no nested object or array, no escape outside the audio either.
Anything else (`None`) is decoded as every other event is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

START: Final = b'{"type":"response.output_audio.delta",'
_DELTA: Final = b'"delta":"'
_FIELD: Final = re.compile(rb'"(event_id|response_id)":"([^"\\]*)"')


@dataclass(frozen=True, slots=True)
class AudioDelta:
    event_id: str
    response_id: str
    chars: int  # base64 characters of the audio


def read(raw: bytes) -> AudioDelta | None:
    """The fields the gateway uses of the audio delta `raw`, or None when `raw`
    is not one laid out as the module says (then decode it)."""
    if not raw.startswith(START):
        return None
    start = raw.find(_DELTA)
    if start < 0:
        return None
    start += len(_DELTA)
    end = raw.find(b'"', start)
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return None
    rest = raw[1:start] + raw[end:]  # the event without its audio
    if b"{" in rest or b"[" in rest or b"\\" in rest or not rest.endswith(b"}"):
        return None
    fields: dict[bytes, bytes] = {}
    for name, value in _FIELD.findall(rest):
        if name in fields:
            return None  # a key twice: the decoder's answer (the last) is not ours to guess
        fields[name] = value
    return AudioDelta(
        event_id=fields.get(b"event_id", b"").decode(),
        response_id=fields.get(b"response_id", b"").decode(),
        chars=end - start,
    )
