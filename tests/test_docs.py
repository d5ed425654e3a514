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


def test_every_gateway_module_is_in_the_gateway_map() -> None:
    text = (DOCS / "gateway.md").read_text()
    package = DOCS.parent / "services" / "switchboard" / "gateway"
    modules = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = [name for name in modules if f"`{name}`" not in text]
    assert modules and not missing, f"docs/gateway.md does not name {missing}"
