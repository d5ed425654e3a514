"""Audio for the simulator's Realtime endpoint: formats, energy, a reply signal (pure).

The Realtime API carries audio as base64 in one of three formats: `audio/pcm`
(16-bit little-endian mono at 24 kHz), `audio/pcmu` (G.711 mu-law, 8 kHz) and
`audio/pcma` (G.711 A-law, 8 kHz). The simulator needs to know how long a
chunk is, how loud each 10 ms of it is (its voice activity detection), and to
make reply audio: a tone, deterministic and easy to check.
"""

from __future__ import annotations

import functools
import math
from array import array
from typing import Final

FORMATS: Final = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
FRAME_MS: Final = 10
TONE_HZ: Final = 440
TONE_AMPLITUDE: Final = 8000


def sample_rate(fmt: str) -> int:
    """Samples per second of a format."""
    return 24_000 if fmt == "audio/pcm" else 8_000


def bytes_per_ms(fmt: str) -> int:
    """Bytes of one millisecond of mono audio in `fmt` (48 for PCM16, 8 for G.711)."""
    return 48 if fmt == "audio/pcm" else 8


def duration_ms(fmt: str, size: int) -> float:
    """Milliseconds of audio in `size` bytes of `fmt`."""
    return size / bytes_per_ms(fmt)


def _ulaw_decode(byte: int) -> int:
    byte = ~byte & 0xFF
    sign, exponent, mantissa = byte & 0x80, (byte >> 4) & 0x07, byte & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def _alaw_decode(byte: int) -> int:
    byte ^= 0x55
    sign, exponent, mantissa = byte & 0x80, (byte >> 4) & 0x07, byte & 0x0F
    magnitude = (
        (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return magnitude if sign else -magnitude


_ULAW: Final = tuple(_ulaw_decode(b) for b in range(256))
_ALAW: Final = tuple(_alaw_decode(b) for b in range(256))


def samples(fmt: str, data: bytes) -> array[int]:
    """The linear 16-bit samples of `data` (an odd trailing PCM byte is dropped)."""
    if fmt == "audio/pcm":
        pcm = array("h")
        pcm.frombytes(data[: len(data) - len(data) % 2])
        return pcm
    table = _ULAW if fmt == "audio/pcmu" else _ALAW
    return array("h", (table[b] for b in data))


def frame_levels(fmt: str, data: bytes) -> list[float]:
    """The RMS level (0..1 of full scale) of each whole 10 ms frame of `data`."""
    pcm = samples(fmt, data)
    size = sample_rate(fmt) * FRAME_MS // 1000
    levels = []
    for start in range(0, len(pcm) - size + 1, size):
        frame = pcm[start : start + size]
        levels.append(math.sqrt(sum(s * s for s in frame) / size) / 32768)
    return levels


def _ulaw_encode(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _alaw_encode(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample), 32767)
    if magnitude < 256:
        code = magnitude >> 4
    else:
        exponent = magnitude.bit_length() - 8
        code = (exponent << 4) | ((magnitude >> (exponent + 3)) & 0x0F)
    return (sign | code) ^ 0x55


@functools.lru_cache(maxsize=4096)
def tone(fmt: str, ms: int, offset_ms: int = 0) -> bytes:
    """`ms` milliseconds of a 440 Hz tone in `fmt`, continuing a tone begun `offset_ms` earlier."""
    rate = sample_rate(fmt)
    first = offset_ms * rate // 1000
    wave = [
        round(TONE_AMPLITUDE * math.sin(2 * math.pi * TONE_HZ * n / rate))
        for n in range(first, first + ms * rate // 1000)
    ]
    if fmt == "audio/pcm":
        return array("h", wave).tobytes()
    encode = _ulaw_encode if fmt == "audio/pcmu" else _alaw_encode
    return bytes(encode(s) for s in wave)
