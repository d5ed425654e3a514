"""Reading an upstream audio delta without decoding it: the same answer as decoding it."""

from __future__ import annotations

import orjson
import pytest

from switchboard.gateway import audio_delta


def delta(**fields: object) -> bytes:
    body = {
        "type": "response.output_audio.delta",
        "event_id": "event_v1f",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "content_index": 0,
        "delta": "AAEC" * 300,
        **fields,
    }
    return orjson.dumps(body)


def test_an_audio_delta_is_read_as_decoding_would_read_it() -> None:
    raw = delta()
    read = audio_delta.read(raw)
    decoded = orjson.loads(raw)
    assert read == audio_delta.AudioDelta(
        decoded["event_id"], decoded["response_id"], len(decoded["delta"])
    )


def test_missing_ids_read_as_empty() -> None:
    raw = b'{"type":"response.output_audio.delta","delta":"AAAA"}'
    assert audio_delta.read(raw) == audio_delta.AudioDelta("", "", 4)


@pytest.mark.parametrize(
    "raw",
    [
        # another type, or the type not first
        delta(type="response.output_audio_transcript.delta"),
        b'{"event_id":"e","type":"response.output_audio.delta","delta":"AAAA"}',
        # a nested object or array, whose keys could be taken for the event's own
        delta(extra={"event_id": "nested"}),
        delta(extra=["x"]),
        # escapes, in the audio or around it
        b'{"type":"response.output_audio.delta","delta":"AA\\/A"}',
        b'{"type":"response.output_audio.delta","event_id":"a\\"b","delta":"AAAA"}',
        # a key twice, no audio, cut short
        b'{"type":"response.output_audio.delta","event_id":"a","event_id":"b","delta":""}',
        b'{"type":"response.output_audio.delta","event_id":"a"}',
        delta()[:-20],
    ],
)
def test_anything_else_is_left_to_the_decoder(raw: bytes) -> None:
    assert audio_delta.read(raw) is None
