"""The ToolExecService over real gRPC: a grpc.aio server on 127.0.0.1:0 and a real stub."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest

from switchboard.toolexec.builtins import CALCULATE, CURRENT_TIME
from switchboard.toolexec.catalog import Catalog
from switchboard.toolexec.registry import CallInfo, Registry, Tool, ToolFailed
from switchboard.toolexec.results import Claimed, MemoryResultStore, StoredResult
from switchboard.toolexec.service import ToolExecServicer
from switchboard.toolexec.tools_config import TenantTools, ToolsConfig
from switchboard.v1 import toolexec_pb2, toolexec_pb2_grpc
from tests.toolexec.support import (
    C,
    Stub,
    T,
    clean_environ,
    execute,
    grpc_stub,
    run_toolexec,
    toolexec_process,
)
from tools.redis_server import free_port


class Probe:
    """Test tools that count their runs, track concurrency and can be held open."""

    def __init__(self) -> None:
        self.runs = 0
        self.active = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def count(self, arguments: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        self.runs += 1
        return {"runs": self.runs, "echo": arguments.get("text")}

    async def held(self, arguments: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        self.runs += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        return {"ok": True}

    async def brief(self, arguments: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.05)
        self.active -= 1
        return {"ok": True}

    async def slow(self, arguments: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        self.runs += 1
        await asyncio.sleep(5)
        return {"ok": True}

    async def crash(self, arguments: dict[str, Any], call: CallInfo) -> Any:
        self.runs += 1
        raise RuntimeError(f"cannot handle {arguments['text']}")

    async def refuse(self, arguments: dict[str, Any], call: CallInfo) -> Any:
        raise ToolFailed("The upstream CRM said no.")

    async def own_timeout(self, arguments: dict[str, Any], call: CallInfo) -> Any:
        raise TimeoutError

    async def big(self, arguments: dict[str, Any], call: CallInfo) -> Any:
        return {"blob": "x" * 70_000}

    async def not_json(self, arguments: dict[str, Any], call: CallInfo) -> Any:
        return {"value": float("nan")}


TEXT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "additionalProperties": False,
}


def probe_registry(probe: Probe) -> Registry:
    def make(name: str, executor: Any, **limits: Any) -> Tool:
        return Tool(name, f"test tool {name}", TEXT_SCHEMA, executor, **limits)

    return Registry(
        [
            CALCULATE,
            CURRENT_TIME,
            make("count", probe.count, timeout_s=0.3),
            make("held", probe.held, timeout_s=5, max_concurrency=1),
            make("brief", probe.brief, timeout_s=5, max_concurrency=2),
            make("slow", probe.slow, timeout_s=0.2),
            make("crash", probe.crash),
            make("refuse", probe.refuse),
            make("own_timeout", probe.own_timeout),
            make("big", probe.big),
            make("not_json", probe.not_json),
        ]
    )


def serving(registry: Registry, **options: Any) -> AbstractAsyncContextManager[Stub]:
    return grpc_stub(ToolExecServicer(Catalog(registry), **options))


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def stub(probe: Probe) -> AsyncIterator[Stub]:
    async with serving(probe_registry(probe)) as client:
        yield client


def error_of(response: toolexec_pb2.ExecuteResponse) -> dict[str, Any]:
    """The model-facing error object, checked against the typed fields."""
    error: dict[str, Any] = json.loads(response.output)["error"]
    assert set(error) == {"code", "message"}
    assert error["message"] == response.error_message
    assert (
        error["code"] == C.ErrorCode.Name(response.error_code).removeprefix("ERROR_CODE_").lower()
    )
    return error


# --- listing and the outcomes --------------------------------------------


async def test_list_tools_describes_server_tools(stub: Stub) -> None:
    reply = await stub.ListTools(T.ListToolsRequest(tenant_id="acme"))
    names = [t.name for t in reply.tools]
    assert names == sorted(names)
    assert {"calculate", "current_time"} <= set(names)
    calculate = next(t for t in reply.tools if t.name == "calculate")
    assert calculate.location == C.TOOL_LOCATION_SERVER
    assert json.loads(calculate.parameters_json) == CALCULATE.parameters
    assert calculate.description == CALCULATE.description


async def test_ok_returns_compact_json(stub: Stub) -> None:
    response = await execute(stub, "calculate", {"expression": "6 * 7"}, call_id="c1")
    assert response.outcome == T.TOOL_OUTCOME_OK
    assert response.output == '{"result":42}'
    assert response.error_code == C.ERROR_CODE_UNSPECIFIED
    assert response.error_message == ""
    assert response.call_id == "c1"
    assert not response.replayed
    response = await execute(stub, "count", {"text": "é"})
    assert response.output == '{"runs":1,"echo":"é"}'


async def test_unknown_tool(stub: Stub) -> None:
    response = await execute(stub, "launch_rockets", {})
    assert response.outcome == T.TOOL_OUTCOME_UNKNOWN_TOOL
    assert response.error_code == C.ERROR_CODE_TOOL_NOT_FOUND
    error = error_of(response)
    assert error["code"] == "tool_not_found"
    assert "launch_rockets" in error["message"]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("calculate", "{not json", "not valid JSON"),
        ("calculate", "[1]", "must be a JSON object, got an array"),
        ("calculate", {}, "Missing required field 'expression'."),
        ("calculate", {"expression": 7}, "Field 'expression' must be a string, got a number."),
        ("calculate", {"expression": "1", "x": 1}, "Unexpected field 'x'"),
        ("calculate", {"expression": "__import__('os')"}, "found a function call"),
        ("calculate", {"expression": "2**99999999"}, "too large"),
        ("current_time", {"timezone": "Mars/Olympus"}, "Field 'timezone' must be an IANA"),
    ],
)
async def test_invalid_arguments_name_the_field(
    stub: Stub, name: str, arguments: Any, expected: str
) -> None:
    response = await execute(stub, name, arguments)
    assert response.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert response.error_code == C.ERROR_CODE_TOOL_INVALID_ARGUMENTS
    assert expected in error_of(response)["message"]


async def test_timeout(stub: Stub, probe: Probe) -> None:
    started = time.monotonic()
    response = await execute(stub, "slow", {})
    assert time.monotonic() - started < 2
    assert response.outcome == T.TOOL_OUTCOME_TIMEOUT
    assert response.error_code == C.ERROR_CODE_TOOL_TIMEOUT
    assert error_of(response)["message"] == "The tool 'slow' did not finish within 0.2 s."
    assert 200 <= response.duration_ms < 2000
    assert probe.runs == 1


async def test_a_tools_own_timeout_error_is_a_failure_not_our_timeout(stub: Stub) -> None:
    response = await execute(stub, "own_timeout", {})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert response.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED


async def test_executor_exception_is_logged_without_argument_values(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.toolexec")
    response = await execute(stub, "crash", {"text": "hunter2"}, call_id="call_9")
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert response.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED
    # The model learns only that it failed: the exception could quote anything.
    assert error_of(response)["message"] == "The tool 'crash' failed."
    (record,) = [r for r in caplog.records if r.getMessage() == "tool raised"]
    assert record.levelno == logging.ERROR
    fields = vars(record)
    assert (fields["tenant_id"], fields["session_id"], fields["call_id"]) == (
        "acme",
        "sess_1",
        "call_9",
    )
    assert fields["tool"] == "crash"
    assert fields["error_type"] == "RuntimeError"
    assert ", in crash" in fields["traceback"]
    assert "hunter2" not in repr(fields)
    assert "hunter2" not in caplog.text


async def test_tool_failed_message_reaches_the_model(stub: Stub) -> None:
    response = await execute(stub, "refuse", {})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert error_of(response) == {
        "code": "tool_execution_failed",
        "message": "The upstream CRM said no.",
    }


async def test_results_over_the_cap_are_refused(stub: Stub) -> None:
    response = await execute(stub, "big", {})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert error_of(response)["message"] == (
        "The tool 'big' returned 70011 bytes, more than the limit of 65536 bytes."
    )


async def test_the_cap_is_configurable(probe: Probe) -> None:
    async with serving(probe_registry(probe), max_output_bytes=10) as client:
        response = await execute(client, "calculate", {"expression": "10**20"})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert "more than the limit of 10 bytes" in response.error_message


async def test_a_result_that_is_not_json_is_an_executor_error(stub: Stub) -> None:
    response = await execute(stub, "not_json", {})
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert (
        error_of(response)["message"] == "The tool 'not_json' returned a result that is not JSON."
    )


async def test_the_catalog_hides_and_refuses_tools(probe: Probe) -> None:
    registry = probe_registry(probe)
    config = ToolsConfig(
        tenants={
            "globex": TenantTools(builtins=frozenset({"calculate"})),
            "acme": TenantTools(builtins=registry.names()),
        }
    )
    server = grpc.aio.server()
    servicer = ToolExecServicer(Catalog(registry, config))
    toolexec_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = toolexec_pb2_grpc.ToolExecServiceStub(channel)
            listed = await client.ListTools(T.ListToolsRequest(tenant_id="globex"))
            assert [t.name for t in listed.tools] == ["calculate"]
            response = await execute(client, "count", {}, tenant="globex")
            assert response.outcome == T.TOOL_OUTCOME_NOT_ALLOWED
            assert response.error_code == C.ERROR_CODE_TOOL_NOT_ALLOWED
            assert error_of(response)["code"] == "tool_not_allowed"
            # A tenant the file does not name may use nothing.
            nobody = await client.ListTools(T.ListToolsRequest(tenant_id="initech"))
            assert list(nobody.tools) == []
            refused = await execute(client, "calculate", {"expression": "1"}, tenant="initech")
            assert refused.outcome == T.TOOL_OUTCOME_NOT_ALLOWED
            assert (await execute(client, "count", {}, tenant="acme")).outcome == T.TOOL_OUTCOME_OK
    finally:
        await server.stop(None)
    assert probe.runs == 1


# --- idempotency ----------------------------------------------------------


async def test_a_retried_call_is_replayed_not_run_again(stub: Stub, probe: Probe) -> None:
    first = await execute(stub, "count", {"text": "a"}, call_id="call_1")
    again = await execute(stub, "count", {"text": "a"}, call_id="call_1")
    assert probe.runs == 1
    assert not first.replayed
    assert again.replayed
    assert again.output == first.output == '{"runs":1,"echo":"a"}'
    assert again.duration_ms == first.duration_ms


async def test_call_ids_are_per_tenant_and_optional(stub: Stub, probe: Probe) -> None:
    await execute(stub, "count", {}, call_id="call_1", tenant="acme")
    other = await execute(stub, "count", {}, call_id="call_1", tenant="globex")
    assert not other.replayed
    await execute(stub, "count", {})
    await execute(stub, "count", {})
    assert probe.runs == 4


async def test_a_reused_call_id_with_other_arguments_is_refused(stub: Stub, probe: Probe) -> None:
    await execute(stub, "count", {"text": "a"}, call_id="call_1")
    response = await execute(stub, "count", {"text": "b"}, call_id="call_1")
    assert response.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert "already used" in error_of(response)["message"]
    assert probe.runs == 1


async def test_concurrent_duplicates_run_once(stub: Stub, probe: Probe) -> None:
    calls = [asyncio.create_task(execute(stub, "held", {}, call_id="dup")) for _ in range(5)]
    while probe.runs == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    probe.release.set()
    responses = await asyncio.gather(*calls)
    assert probe.runs == 1
    assert all(r.outcome == T.TOOL_OUTCOME_OK for r in responses)
    assert sorted(r.replayed for r in responses) == [False, True, True, True, True]


async def test_failures_of_a_run_are_kept(stub: Stub, probe: Probe) -> None:
    first = await execute(stub, "slow", {}, call_id="call_t")
    again = await execute(stub, "slow", {}, call_id="call_t")
    assert first.outcome == again.outcome == T.TOOL_OUTCOME_TIMEOUT
    assert again.replayed
    assert probe.runs == 1


async def test_refusals_before_running_are_not_kept(stub: Stub) -> None:
    first = await execute(stub, "count", {"text": 1}, call_id="call_r")
    again = await execute(stub, "count", {"text": 1}, call_id="call_r")
    assert first.outcome == again.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert not again.replayed


async def test_a_caller_giving_up_does_not_cancel_the_run(stub: Stub, probe: Probe) -> None:
    request = T.ExecuteRequest(tenant_id="acme", call_id="call_d", name="held", arguments="{}")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Execute(request, timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    retry = asyncio.ensure_future(stub.Execute(request, timeout=10))
    await asyncio.sleep(0.05)
    probe.release.set()
    response = await retry
    assert response.outcome == T.TOOL_OUTCOME_OK
    assert response.replayed
    assert probe.runs == 1


async def test_memory_store_drops_the_least_recently_used() -> None:
    store = MemoryResultStore(max_entries=2)
    for call_id in ("a", "b"):
        assert isinstance(await store.claim("t", call_id, "f", lease_s=1), Claimed)
        await store.put("t", call_id, StoredResult("f", call_id.encode()))
    assert await store.peek("t", "a") is not None  # "a" is now the most recent
    await store.put("t", "c", StoredResult("f", b"c"))
    assert len(store) == 2
    assert await store.peek("t", "b") is None
    assert await store.claim("t", "a", "f", lease_s=1) == StoredResult("f", b"a")
    assert await store.peek("t", "c") is not None
    with pytest.raises(ValueError, match="max_entries"):
        MemoryResultStore(max_entries=0)


# --- concurrency ----------------------------------------------------------


async def test_concurrency_limit_is_respected(stub: Stub, probe: Probe) -> None:
    responses = await asyncio.gather(*(execute(stub, "brief", {}) for _ in range(6)))
    assert all(r.outcome == T.TOOL_OUTCOME_OK for r in responses)
    assert probe.peak == 2


async def test_no_free_slot_in_time_is_a_timeout_that_is_not_kept(probe: Probe) -> None:
    registry = probe_registry(probe)
    async with serving(registry) as client:
        slot = registry.semaphore("count")
        # Take the tool's only slots, as calls already running would.
        for _ in range(16):
            await slot.acquire()
        busy = await execute(client, "count", {}, call_id="call_b")
        assert busy.outcome == T.TOOL_OUTCOME_TIMEOUT
        assert busy.error_code == C.ERROR_CODE_TOOL_TIMEOUT
        assert "busy: no free slot within 0.3 s (16 calls already running)" in busy.error_message
        assert probe.runs == 0
        for _ in range(16):
            slot.release()
        retry = await execute(client, "count", {}, call_id="call_b")
    assert retry.outcome == T.TOOL_OUTCOME_OK
    assert not retry.replayed
    assert probe.runs == 1


# --- the process ----------------------------------------------------------


def test_bad_settings_exit_2_naming_the_variable() -> None:
    done = run_toolexec(clean_environ(SWITCHBOARD_TOOLEXEC_LISTEN="nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "toolexec: configuration error: SWITCHBOARD_TOOLEXEC_LISTEN must be HOST:PORT, "
        "got 'nowhere'"
    ]


async def test_the_process_serves_health_and_tools_then_drains() -> None:
    port = free_port()
    env = clean_environ(SWITCHBOARD_TOOLEXEC_LISTEN=f"127.0.0.1:{port}")
    async with toolexec_process(env, port) as process:
        response = await execute(process.stub, "calculate", {"expression": "2 + 2"})
        assert response.output == '{"result":4}'
    assert process.returncode == 0
    messages = [json.loads(line)["msg"] for line in process.stderr.splitlines()]
    assert messages[0] == "listening"
    assert messages[-1] == "stopped"
