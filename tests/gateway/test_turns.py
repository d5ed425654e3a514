"""The turn runner in-process: a real protocol, real tenant limits in a real Redis,
and the gateway's in-memory backends (switchboard.gateway.testing) scripting the
model, the tools and failures at every step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from switchboard.errors import ServiceUnavailable, SwitchboardError
from switchboard.gateway.eventlog import EventRecorder, SessionWriter
from switchboard.gateway.metrics import GatewayMetrics
from switchboard.gateway.protocol import RealtimeProtocol, State
from switchboard.gateway.tenant_gate import TenantGate
from switchboard.gateway.testing import (
    Call,
    Fail,
    Finish,
    MemoryBackends,
    Script,
    Text,
    Wait,
    canned_tool,
    eventually,
    reply,
)
from switchboard.gateway.turns import Reattach, Turn, TurnRunner
from switchboard.limits import TenantLimiter
from switchboard.redis_client import any_client
from switchboard.tenancy import Limits, Tenant
from switchboard.v1 import common_pb2, session_pb2, toolexec_pb2
from tools.redis_server import RedisServer

Event = dict[str, Any]


@dataclass
class Harness:
    """A session's turn runner and everything around it."""

    protocol: RealtimeProtocol
    backends: MemoryBackends
    runner: TurnRunner
    tenant: Tenant
    metrics: GatewayMetrics
    events: list[Event] = field(default_factory=list)
    refused: list[SwitchboardError] = field(default_factory=list)
    taken_over: list[bool] = field(default_factory=list)

    def ask(self, **response: Any) -> Turn:
        """A client's `response.create`, run as a turn."""
        event: Event = {"type": "response.create"}
        if response:
            event["response"] = response
        (command,) = self.protocol.receive_text(_json(event))
        return self.runner.start(command)

    async def turn(self, **response: Any) -> list[Event]:
        """Run a turn to its end; the events it published."""
        start = len(self.events)
        turn = self.ask(**response)
        await turn.wait()
        return self.events[start:]

    def items(self) -> list[common_pb2.Item]:
        return self.backends.items(self.tenant.id, self.protocol.session_id)


def _json(event: Event) -> str:
    import orjson

    return orjson.dumps(event).decode()


def types(events: list[Event]) -> list[str]:
    return [event["type"] for event in events]


def done(events: list[Event]) -> list[Event]:
    return [event["response"] for event in events if event["type"] == "response.done"]


def errors_of(events: list[Event]) -> list[str]:
    return [event["error"]["code"] for event in events if event["type"] == "error"]


def text_of(events: list[Event]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Any]:
    redis = any_client(redis_server.url, cluster=False)
    recorders: list[EventRecorder] = []

    async def build(
        tenant: Tenant | None = None,
        *,
        max_tool_rounds: int = 3,
        resume: Harness | None = None,
    ) -> Harness:
        """A new session's runner; or, given `resume`, another connection's runner
        of that harness's session (a resume)."""
        config = session_pb2.SessionConfig(model="gpt-realtime", tool_choice="auto")
        if resume is None:
            tenant = tenant or Tenant("acme-" + str(len(recorders)))
            backends = MemoryBackends()
            session = await backends.create_session(tenant.id, config)
        else:
            tenant, backends = resume.tenant, resume.backends
            session = await backends.get_session(tenant.id, resume.protocol.session_id)
        protocol = RealtimeProtocol(session_id=session.id, config=config, max_event_bytes=1 << 16)
        protocol.open(resumed=resume is not None)
        protocol.take_events()
        recorder = EventRecorder(backends)
        recorders.append(recorder)
        writer = SessionWriter(backends, recorder, tenant.id, session.id, "conn_test", 10.0)
        metrics = GatewayMetrics()
        holder: list[Harness] = []

        def publish() -> None:
            holder[0].events.extend(protocol.take_events())

        runner = TurnRunner(
            protocol,
            backends,
            TenantGate(TenantLimiter(redis), reserve_output_tokens=100),
            metrics,
            tenant,
            writer,
            publish=publish,
            on_refused=lambda error: holder[0].refused.append(error),
            on_taken_over=lambda: holder[0].taken_over.append(True),
            max_tool_rounds=max_tool_rounds,
        )
        holder.append(Harness(protocol, backends, runner, tenant, metrics))
        return holder[0]

    yield build
    for recorder in recorders:
        await recorder.close()
    await redis.aclose()


async def test_a_turn_streams_its_text_stores_its_item_and_ends_completed(make: Any) -> None:
    h = await make()
    h.backends.model.queue(reply("Hello", ", ", "world."))
    events = await h.turn()
    assert types(events)[0] == "response.created"
    assert text_of(events) == "Hello, world."
    (response,) = done(events)
    assert response["status"] == "completed"
    assert response["usage"]["output_tokens"] == 5  # the upstream's, not an estimate
    (item,) = h.items()
    assert item.role == common_pb2.ROLE_ASSISTANT
    assert item.content[0].text == "Hello, world."
    assert item.status == common_pb2.ITEM_STATUS_COMPLETED
    assert h.protocol.state is State.IDLE
    ttft = "switchboard_gateway_time_to_first_token_seconds_count"
    assert h.metrics.registry.get_sample_value(ttft, {"model": "other"}) == 1
    # The broker named itself, and the gateway noted it in the session for a resume.
    note = (response["id"], "broker-a:50052")
    await eventually(lambda: h.backends.noted_broker(h.tenant.id, h.protocol.session_id) == note)


async def test_the_context_sent_is_the_sessions_with_the_responses_instructions(make: Any) -> None:
    h = await make()
    await h.backends.append_item(
        h.tenant.id,
        h.protocol.session_id,
        common_pb2.Item(
            id="item_u",
            type=common_pb2.ITEM_TYPE_MESSAGE,
            role=common_pb2.ROLE_USER,
            content=[common_pb2.ContentPart(type=common_pb2.CONTENT_TYPE_INPUT_TEXT, text="hi")],
        ),
    )
    await h.turn(instructions="Be brief.")
    (request,) = h.backends.model.requests
    assert request.context.instructions == "Be brief."
    assert [item.id for item in request.context.items] == ["item_u"]


async def test_the_tool_catalogue_is_fetched_while_the_context_is_read(make: Any) -> None:
    h = await make()
    h.backends.tools["lookup"] = canned_tool("lookup", "{}")
    listed, read = asyncio.Event(), asyncio.Event()
    h.backends.gates["list_tools"], h.backends.gates["build_context"] = listed, read
    h.backends.model.queue(reply("ok"))
    turn = h.ask()
    # Both asked for before either answered: neither waits for the other.
    await eventually(
        lambda: h.backends.calls["list_tools"] == h.backends.calls["build_context"] == 1
    )
    listed.set()
    read.set()
    await turn.wait()
    (request,) = h.backends.model.requests
    assert [tool.name for tool in request.tools] == ["lookup"]


@pytest.mark.parametrize("stage", ["context", "first token", "mid-stream"])
async def test_a_cancel_at_each_stage_ends_the_response_cancelled(make: Any, stage: str) -> None:
    h = await make()
    release = asyncio.Event()
    if stage == "context":
        h.backends.gates["build_context"] = release
    elif stage == "first token":
        h.backends.model.queue(Script([Wait(release), Text("late"), Finish()]))
    else:
        h.backends.model.queue(Script([Text("partial "), Wait(release), Text("rest"), Finish()]))
    turn = h.ask()
    response_id = turn.command.response_id
    if stage == "mid-stream":
        while "partial" not in text_of(h.events):
            await asyncio.sleep(0.001)
    else:
        await asyncio.sleep(0.01)
    assert turn.cancel("client_cancelled", response_id)
    await turn.wait()
    (response,) = done(h.events)
    assert response["status"] == "cancelled"
    assert response["status_details"]["reason"] == "client_cancelled"
    if stage == "context":
        # Cancelled before the model was asked: nothing to stop at the broker.
        assert h.backends.model.requests == []
        assert h.items() == []
    else:
        # The broker was told to stop the call (not keep it for a resume).
        assert h.backends.model.cancelled == [response_id]
    if stage == "mid-stream":
        (item,) = h.items()
        assert (item.status, item.content[0].text) == (
            common_pb2.ITEM_STATUS_INCOMPLETE,
            "partial ",
        )
        assert response["usage"]["output_tokens"] == 2  # estimated from 8 characters
    assert h.protocol.state is State.IDLE


async def test_a_cancel_for_another_response_or_after_the_end_does_nothing(make: Any) -> None:
    h = await make()
    release = asyncio.Event()
    h.backends.model.queue(Script([Wait(release), Text("x"), Finish()]))
    turn = h.ask()
    assert not turn.cancel("client_cancelled", "resp_other")
    release.set()
    await turn.wait()
    assert not turn.cancel("client_cancelled", turn.command.response_id)
    assert done(h.events)[0]["status"] == "completed"


async def test_server_tools_run_and_the_turn_follows_up(make: Any) -> None:
    h = await make()
    h.backends.tools["calc"] = canned_tool("calc", '{"result": 4}')
    h.backends.model.queue(
        Script([Call(0, "call_1", "calc", '{"expression": "2+2"}'), Finish("tool_calls")]),
        reply("It is 4."),
    )
    events = await h.turn()
    first, second = done(events)
    assert (first["status"], second["status"]) == ("completed", "completed")
    assert [call.name for call in h.backends.tool_calls] == ["calc"]
    kinds = [item.type for item in h.items()]
    assert kinds == [
        common_pb2.ITEM_TYPE_FUNCTION_CALL,
        common_pb2.ITEM_TYPE_FUNCTION_CALL_OUTPUT,
        common_pb2.ITEM_TYPE_MESSAGE,
    ]
    assert h.items()[1].output == '{"result": 4}'
    # The server tool was offered to the model; the output reached the client.
    assert [tool.name for tool in h.backends.model.requests[0].tools] == ["calc"]
    added = [e for e in events if e["type"] == "conversation.item.added"]
    assert any(e["item"]["type"] == "function_call_output" for e in added)
    assert h.protocol.state is State.IDLE


async def test_the_tool_rounds_stop_at_the_limit(make: Any) -> None:
    h = await make(max_tool_rounds=2)
    h.backends.tools["calc"] = canned_tool("calc")
    h.backends.model.queue(
        *(Script([Call(0, f"call_{i}", "calc", "{}"), Finish("tool_calls")]) for i in range(5))
    )
    events = await h.turn()
    assert len(done(events)) == 3  # the first response and two follow-ups
    assert len(h.backends.tool_calls) == 2
    assert errors_of(events) == ["tool_rounds_exceeded"]
    assert h.protocol.state is State.IDLE


async def test_calls_to_client_tools_are_the_clients_to_run(make: Any) -> None:
    h = await make()
    h.backends.tools["calc"] = canned_tool("calc")
    h.backends.model.queue(
        Script(
            [
                Call(0, "call_c", "lookup", "{}"),
                Call(1, "call_s", "calc", "{}"),
                Finish("tool_calls"),
            ]
        )
    )
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    events = await h.turn(tools=tools)
    # toolexec runs its call; the client runs its own and asks for the next response.
    assert [call.name for call in h.backends.tool_calls] == ["calc"]
    assert len(done(events)) == 1
    assert h.protocol.state is State.IDLE


async def test_a_failing_tool_is_reported_and_its_error_goes_to_the_model(make: Any) -> None:
    h = await make()
    h.backends.tools["calc"] = canned_tool(
        "calc",
        '{"error": "boom"}',
        outcome=toolexec_pb2.TOOL_OUTCOME_EXECUTOR_ERROR,
        error="boom",
    )
    h.backends.model.queue(Script([Call(0, "call_1", "calc", "{}"), Finish("tool_calls")]))
    events = await h.turn()
    assert errors_of(events) == ["tool_execution_failed"]
    assert h.items()[1].output == '{"error": "boom"}'
    assert len(done(events)) == 2


async def test_a_cancel_while_tools_run_ends_the_turn(make: Any) -> None:
    h = await make()
    gate = asyncio.Event()
    h.backends.tools["slow"] = canned_tool("slow", gate=gate)
    h.backends.model.queue(Script([Call(0, "call_1", "slow", "{}"), Finish("tool_calls")]))
    turn = h.ask()
    while not h.backends.tool_calls:
        await asyncio.sleep(0.001)
    assert h.protocol.state is State.TOOLS
    assert turn.cancel("drain")
    await turn.wait()
    assert len(done(h.events)) == 1  # no follow-up
    assert h.protocol.state is State.IDLE
    # A client may ask again at once.
    h.backends.model.queue(reply("again"))
    assert done(await h.turn())[0]["status"] == "completed"


@pytest.mark.parametrize(
    ("script", "code", "kept"),
    [
        (Script([Fail("upstream_error")]), "upstream_error", None),
        (Script([Fail("server_busy")]), "server_busy", None),
        (
            Script([Text("so far"), Fail("upstream_stream_broken")]),
            "upstream_stream_broken",
            "so far",
        ),
    ],
    ids=["before the first token", "shed by admission", "after the first token"],
)
async def test_a_broker_failure_ends_the_response_failed(
    make: Any, script: Script, code: str, kept: str | None
) -> None:
    h = await make()
    h.backends.model.queue(script)
    events = await h.turn()
    (response,) = done(events)
    assert response["status"] == "failed"
    assert response["status_details"]["error"]["code"] == code
    assert errors_of(events) == [code]
    if kept is None:
        assert h.items() == []
    else:
        (item,) = h.items()
        assert (item.status, item.content[0].text) == (common_pb2.ITEM_STATUS_INCOMPLETE, kept)


async def test_a_session_service_failure_fails_the_response_and_keeps_the_session(
    make: Any,
) -> None:
    h = await make()
    h.backends.failures["build_context"] = ServiceUnavailable("The session service is down.")
    events = await h.turn()
    assert done(events)[0]["status"] == "failed"
    assert errors_of(events) == ["service_unavailable"]
    assert h.backends.model.requests == []
    del h.backends.failures["build_context"]
    assert done(await h.turn())[0]["status"] == "completed"


async def test_output_that_cannot_be_stored_fails_the_response(make: Any) -> None:
    # The session service died while the model streamed: the reply was seen but is
    # not in the conversation, so the response ends `failed` (docs/protocol.md),
    # with one error, not `completed` plus an error.
    h = await make()
    h.backends.failures["append_item"] = ServiceUnavailable("The session service is down.")
    events = await h.turn()
    assert errors_of(events) == ["service_unavailable"]
    body = done(events)[0]
    assert body["status"] == "failed"
    assert body["status_details"]["error"]["code"] == "service_unavailable"
    del h.backends.failures["append_item"]
    assert done(await h.turn())[0]["status"] == "completed"


async def test_a_bug_in_a_turn_ends_its_response_failed_and_the_session_goes_on(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # An exception no code path expects (here while the output is stored): the
    # client still gets `response.done`, and the next response runs.
    h = await make()
    h.backends.failures["append_item"] = RuntimeError("a bug")  # type: ignore[assignment]
    events = await h.turn()
    assert errors_of(events) == ["internal_error"]
    body = done(events)[0]
    assert body["status"] == "failed"
    assert body["status_details"]["error"]["code"] == "internal_error"
    assert "a bug" not in str(events)
    assert "turn failed" in caplog.text
    del h.backends.failures["append_item"]
    assert done(await h.turn())[0]["status"] == "completed"


async def test_a_spent_budget_fails_the_response_and_ends_the_connection(
    make: Any,
) -> None:
    tenant = Tenant("budget-" + str(id(make)), daily_token_budget=1)
    h = await make(tenant)
    events = await h.turn()
    assert done(events)[0]["status_details"]["error"]["code"] == "insufficient_quota"
    assert [error.name for error in h.refused] == ["insufficient_quota"]
    assert h.backends.model.requests == []


async def test_a_rate_limited_tenant_gets_rate_limits_updated(make: Any) -> None:
    tenant = Tenant("rpm-" + str(id(make)), limits=Limits(requests_per_minute=1))
    h = await make(tenant)
    first = await h.turn()
    assert "rate_limits.updated" in types(first)
    second = await h.turn()
    assert done(second)[0]["status_details"]["error"]["code"] == "rate_limit_exceeded"
    assert h.refused == []  # retryable: the connection goes on


async def test_a_response_another_connection_took_over_stops_without_ending(make: Any) -> None:
    h = await make()
    h.backends.model.queue(Script([Text("a"), Fail("session_taken_over")]))
    events = await h.turn()
    assert h.taken_over == [True]
    assert done(events) == []
    assert h.items() == []


async def test_a_reattached_response_finishes_from_where_its_log_ends(make: Any) -> None:
    h = await make()
    release = asyncio.Event()
    h.backends.model.queue(
        Script([Text("Hello"), Text(" there"), Wait(release), Text(", friend.")])
    )
    h.backends.model.scripts[0].steps.append(Finish())
    dying = h.ask()
    while "there" not in text_of(h.events):
        await asyncio.sleep(0.001)
    dying.abandon()  # its gateway dies: the call is left at the broker, not cancelled
    await dying.wait()
    assert h.backends.model.cancelled == []
    logged = list(h.events)
    # Another connection takes the response up where the dead one's log ends.
    taker = await make(resume=h)
    command = taker.protocol.reopen(logged)
    release.set()
    turn = taker.runner.start(command, Reattach(command, "broker-a:50052"))
    await turn.wait()
    assert text_of(logged + taker.events) == "Hello there, friend."
    assert done(taker.events)[0]["status"] == "completed"
    assert h.backends.model.attached == [("broker-a:50052", command.response_id)]
    (item,) = h.items()
    assert item.content[0].text == "Hello there, friend."
    # The item kept the id the dead gateway gave it.
    added = next(e for e in logged if e["type"] == "response.output_item.added")
    assert item.id == added["item"]["id"]


async def test_a_reattach_to_a_call_that_is_gone_ends_interrupted(make: Any) -> None:
    h = await make()
    logged: list[Event] = [
        {
            "type": "response.created",
            "event_id": "event_x",
            "response": {"id": "resp_gone", "max_output_tokens": "inf", "metadata": None},
        }
    ]
    command = h.protocol.reopen(logged)
    turn = h.runner.start(command, Reattach(command, "broker-b:50052"))
    await turn.wait()
    (response,) = done(h.events)
    assert response["status"] == "failed"
    assert response["status_details"]["error"]["code"] == "response_interrupted"
