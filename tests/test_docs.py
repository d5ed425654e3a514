"""The user-facing docs cover what the code defines."""

from __future__ import annotations

from pathlib import Path

from switchboard import errors
from switchboard.v1 import common_pb2

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_error_code_is_documented() -> None:
    text = (DOCS / "errors.md").read_text()
    missing = [
        errors.code_name(code)
        for code in common_pb2.ErrorCode.values()
        if code and f"`{errors.code_name(code)}`" not in text
    ]
    assert not missing, f"docs/errors.md does not document {missing}"
