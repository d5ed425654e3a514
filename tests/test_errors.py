"""The error catalogue: every code has a spec, names round-trip, transports agree."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from switchboard import errors
from switchboard.v1 import common_pb2


def all_codes() -> list[int]:
    return [v for v in common_pb2.ErrorCode.values() if v != common_pb2.ERROR_CODE_UNSPECIFIED]


@pytest.mark.parametrize("code", all_codes())
def test_every_code_has_a_spec_and_a_stable_name(code: int) -> None:
    assert code in errors.SPECS, f"{common_pb2.ErrorCode.Name(code)} has no Spec"  # type: ignore[arg-type]
    name = errors.code_name(code)
    assert name == name.lower() and not name.startswith("error_code")
    assert errors.code_from_name(name) == code


def test_unknown_name_is_none() -> None:
    assert errors.code_from_name("made_up") is None


def test_event_and_http_forms() -> None:
    error = errors.ItemNotFound("No item with id 'x'.", param="item_id")
    assert error.to_event_error("evt1") == {
        "type": "invalid_request_error",
        "code": "item_not_found",
        "message": "No item with id 'x'.",
        "param": "item_id",
        "event_id": "evt1",
    }
    assert error.to_http_body()["error"]["code"] == "item_not_found"
    assert error.spec.grpc_status == grpc.StatusCode.NOT_FOUND


class FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]) -> None:
        self._status, self._trailers = status, trailers

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return "The session store is unavailable."

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def test_rpc_error_with_trailers_keeps_its_code() -> None:
    original = errors.SessionStoreUnavailable("The session store is unavailable.", retry_after=1.5)
    rebuilt = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, original.grpc_trailers()), service="session"
    )
    assert rebuilt.code == original.code
    assert rebuilt.retry_after == 1.5
    assert rebuilt.message == original.message


def test_rpc_error_without_trailers_is_service_unavailable() -> None:
    rebuilt = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, ()), service="broker")
    assert rebuilt.name == "service_unavailable"
    assert "broker" in rebuilt.message


def _close_code_table() -> dict[int, tuple[set[str], str]]:
    """docs/errors.md's close-code table: code -> (reasons, then)."""
    text = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    section = text[text.index("## Close codes") :]
    table: dict[int, tuple[set[str], str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            reasons = set(re.findall(r"`([a-z_ ]+)`", cells[1]))
            table[int(cells[0])] = (reasons, cells[2])
    return table


def test_close_codes_follow_the_rule_and_the_docs_say_so() -> None:
    table = _close_code_table()
    assert table, "no close-code table in docs/errors.md"
    for code, (_, then) in table.items():
        assert then == ("stop" if errors.close_is_terminal(code) else "resume"), code
    for code, spec in errors.SPECS.items():
        if spec.close_code is None:
            continue
        name = errors.code_name(code)
        assert spec.close_code in table, f"{name}: close {spec.close_code} not documented"
        assert name in table[spec.close_code][0], f"{name} not listed under {spec.close_code}"
        # Every close of ours is in one of the two ranges, or a standard code.
        assert spec.close_code in errors.RESUMABLE_CLOSE_CODES or spec.close_code in (
            *errors.TERMINAL_CLOSE_CODES,
            1008,
            1009,
            1011,
            1012,
            1013,
        )


@pytest.mark.parametrize(
    ("code", "terminal"),
    [
        (1008, True),
        (1011, False),
        (1012, False),
        (1013, False),
        (4008, False),
        (4499, False),
        (4500, True),
        (4529, True),
        (4999, True),
    ],
)
def test_close_is_terminal(code: int, terminal: bool) -> None:
    assert errors.close_is_terminal(code) is terminal


@pytest.mark.parametrize(
    ("name", "terminal"),
    [
        ("invalid_api_key", True),
        ("insufficient_quota", True),
        ("session_taken_over", True),
        ("session_not_found", True),
        ("slow_consumer", False),
        ("idle_timeout", False),
        ("session_expired", False),
        ("server_busy", False),
    ],
)
def test_a_close_is_terminal_when_no_reconnect_can_cure_it(name: str, terminal: bool) -> None:
    code = errors.code_from_name(name)
    assert code is not None
    close = errors.spec(code).close_code
    assert close is not None and errors.close_is_terminal(close) is terminal
