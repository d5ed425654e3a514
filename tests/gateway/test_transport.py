"""The gateway's WebSocket transport: the text frames `send_frames` writes itself."""

from __future__ import annotations

import pytest
from websockets.frames import OP_TEXT, Frame

from switchboard.gateway.transport import _frame_head


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1_000_000])
def test_a_frame_is_what_the_websockets_library_serializes(length: int) -> None:
    payload = b"x" * length
    expected = Frame(OP_TEXT, payload).serialize(mask=False, extensions=[])
    assert _frame_head(length) + payload == expected
