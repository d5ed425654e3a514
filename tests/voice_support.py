"""Real speech for the voice tests: `espeak-ng` speaks, `sox` makes it 24 kHz PCM16.

Both are Debian packages (.ci/run installs them). Audio is cached per text for
the test run, so a phrase is synthesised once.
"""

from __future__ import annotations

import base64
import functools
import subprocess
import tempfile
from pathlib import Path

RATE = 24_000
BYTES_PER_MS = RATE * 2 // 1000


@functools.cache
def speech(text: str) -> bytes:
    """`text` spoken by espeak-ng, as 24 kHz mono PCM16 little-endian (no header)."""
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        raw = subprocess.run(
            [
                "sox",
                str(wav),
                "-t",
                "raw",
                "-r",
                str(RATE),
                "-c",
                "1",
                "-e",
                "signed",
                "-b",
                "16",
                "-L",
                "-",
            ],
            check=True,
            capture_output=True,
        ).stdout
    return raw


def silence(ms: int) -> bytes:
    """`ms` milliseconds of PCM16 silence at 24 kHz."""
    return bytes(BYTES_PER_MS * ms)


def chunks(pcm: bytes, ms: int = 20) -> list[str]:
    """`pcm` in `ms`-millisecond chunks, each base64 (as `input_audio_buffer.append` carries it)."""
    size = BYTES_PER_MS * ms
    return [base64.b64encode(pcm[i : i + size]).decode() for i in range(0, len(pcm), size)]


def duration_ms(pcm: bytes) -> float:
    """Milliseconds of 24 kHz PCM16 audio."""
    return len(pcm) / BYTES_PER_MS
