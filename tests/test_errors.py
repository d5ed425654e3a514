"""The error catalogue: every code has a spec, names round-trip, transports agree."""

from __future__ import annotations

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
