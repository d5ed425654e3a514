"""Webhook tools end to end: real gRPC servicer, real aiohttp client, real receiver on 127.0.0.1.

The receiver checks every signature with `verify_signature` and refuses what
does not verify, so a passing call proves the signature is real.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from switchboard.toolexec.signing import SIGNATURE_HEADER, verify_signature
from switchboard.toolexec.webhooks import WebhookClient
from tests.toolexec.receiver import ERROR_BODY, LEAKY_VALUE, SECRET, Receiver
from tests.toolexec.support import (
    ENVIRON,
    ORDER_PARAMETERS,
    C,
    T,
    config,
    execute,
    grpc_stub,
    listed,
    servicer,
    webhook,
)

ORDER = {"order_id": "ord_1", "lines": [{"sku": "a", "qty": 2}]}


def error_message(response: Any) -> str:
    error = json.loads(response.output)["error"]
    assert error["message"] == response.error_message
    return str(response.error_message)


async def test_a_webhook_call_is_signed_delivered_and_answered(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    tools = config([webhook("lookup_order", receiver.url("/echo"))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        reply = await stub.ListTools(T.ListToolsRequest(tenant_id="acme"))
        response = await execute(stub, "lookup_order", ORDER, call_id="call_1")
    (definition,) = [t for t in reply.tools if t.name == "lookup_order"]
    assert definition.location == C.TOOL_LOCATION_SERVER
    assert definition.description == "test webhook lookup_order"
    assert json.loads(definition.parameters_json) == ORDER_PARAMETERS

    assert response.outcome == T.TOOL_OUTCOME_OK, response.error_message
    assert json.loads(response.output) == {
        "echo": ORDER,
        "tenant": "acme",
        "call_id": "call_1",
        "tool": "lookup_order",
    }
    (request,) = receiver.requests
    assert request.verified
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == b'{"order_id":"ord_1","lines":[{"sku":"a","qty":2}]}'
    signature = request.headers[SIGNATURE_HEADER]
    match = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", signature)
    assert match is not None
    assert abs(int(match.group(1)) - time.time()) < 10
    # The signature covers the body: any change, or another secret, fails it.
    assert not verify_signature(SECRET, signature, request.body + b" ")
    assert not verify_signature("another-secret-0123456789", signature, request.body)


async def test_a_wrong_secret_is_rejected_by_the_receiver(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    environ = {**ENVIRON, "ACME_SECRET": "not-the-receivers-secret-0123"}
    tools = config([webhook("lookup_order", receiver.url("/echo"))], environ=environ)
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", ORDER)
    assert [r.verified for r in receiver.requests] == [False]
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert response.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED
    assert error_message(response) == (
        "The webhook 'lookup_order' answered HTTP 401: bad signature"
    )


async def test_a_non_2xx_answer_names_the_status_and_a_short_part_of_the_body(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    tools = config([webhook("lookup_order", receiver.url("/fail"))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", ORDER, call_id="call_f")
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    message = error_message(response)
    assert message.startswith("The webhook 'lookup_order' answered HTTP 500: database exploded")
    assert len(message) < 300
    assert ERROR_BODY[:500] not in message
    assert LEAKY_VALUE not in response.output


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
async def test_a_body_over_the_cap_is_refused_without_reading_it(
    receiver: Receiver, webhooks: WebhookClient, path: str
) -> None:
    tools = config([webhook("lookup_order", receiver.url(path), max_response_bytes=65536)])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        started = time.monotonic()
        response = await execute(stub, "lookup_order", ORDER)
        elapsed = time.monotonic() - started
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert error_message(response) == (
        "The webhook 'lookup_order' sent a response larger than 65536 bytes."
    )
    assert elapsed < 2


async def test_a_slow_webhook_times_out(receiver: Receiver, webhooks: WebhookClient) -> None:
    tools = config([webhook("lookup_order", receiver.url("/slow"), timeout_s=0.3)])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        started = time.monotonic()
        response = await execute(stub, "lookup_order", ORDER)
        elapsed = time.monotonic() - started
    assert response.outcome == T.TOOL_OUTCOME_TIMEOUT
    assert response.error_code == C.ERROR_CODE_TOOL_TIMEOUT
    assert error_message(response) == "The tool 'lookup_order' did not finish within 0.3 s."
    assert 0.3 <= elapsed < 2


@pytest.mark.parametrize(
    ("path", "output"),
    [("/text", '"plain words, not JSON"'), ("/empty", "null")],
)
async def test_a_body_that_is_not_json_reaches_the_model_as_a_string(
    receiver: Receiver, webhooks: WebhookClient, path: str, output: str
) -> None:
    tools = config([webhook("lookup_order", receiver.url(path))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", ORDER)
    assert response.outcome == T.TOOL_OUTCOME_OK
    assert response.output == output


async def test_redirects_are_not_followed(receiver: Receiver, webhooks: WebhookClient) -> None:
    tools = config([webhook("lookup_order", receiver.url("/redirect"))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", ORDER)
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert "answered HTTP 302" in response.error_message
    assert receiver.count("/echo") == 0


async def test_a_compressed_body_is_refused(receiver: Receiver, webhooks: WebhookClient) -> None:
    tools = config([webhook("lookup_order", receiver.url("/gzip"))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", ORDER)
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert "compressed body" in response.error_message
    assert receiver.requests[0].headers["Accept-Encoding"] == "identity"


# --- where webhooks may connect ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.5/hook", "webhook destination 10.0.0.5 is a private address"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "webhook destination 169.254.169.254 is a link-local address",
        ),
        ("http://[::1]/hook", "webhook destination ::1 is a loopback address"),
        ("http://[::ffff:10.0.0.5]/hook", "webhook destination ::ffff:a00:5 is a private address"),
        ("http://0.0.0.0/hook", "webhook destination 0.0.0.0 is an unspecified address"),
        ("http://127.1/hook", "webhook destination 127.1 is not a valid IP address"),
        ("http://2130706433/hook", "webhook destination 2130706433 is not a valid IP address"),
    ],
)
async def test_private_destinations_are_refused_before_connecting(
    webhooks: WebhookClient, url: str, expected: str
) -> None:
    tools = config([webhook("lookup_order", url)], allow=())
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        started = time.monotonic()
        response = await execute(stub, "lookup_order", ORDER)
    # No connection attempt: this machine has no route to 10.0.0.5, so
    # trying would fail differently ("could not be reached") or hang.
    assert time.monotonic() - started < 1
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert response.error_code == C.ERROR_CODE_TOOL_EXECUTION_FAILED
    assert error_message(response) == f"The webhook 'lookup_order' was not called: {expected}."


async def test_loopback_is_refused_unless_allow_listed(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    hooks = [webhook("lookup_order", receiver.url("/echo"))]
    async with grpc_stub(servicer(config(hooks, allow=()), webhooks)) as stub:
        refused = await execute(stub, "lookup_order", ORDER)
    assert "webhook destination 127.0.0.1 is a loopback address" in refused.error_message
    assert receiver.requests == []
    async with grpc_stub(servicer(config(hooks, allow=("127.0.0.1",)), webhooks)) as stub:
        allowed = await execute(stub, "lookup_order", ORDER)
    assert allowed.outcome == T.TOOL_OUTCOME_OK
    assert receiver.count("/echo") == 1


async def test_a_name_is_refused_when_it_resolves_to_a_private_address(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    url = f"http://localhost:{receiver.port}/echo"
    async with grpc_stub(servicer(config([webhook("lookup_order", url)], allow=()), webhooks)) as s:
        response = await execute(s, "lookup_order", ORDER)
    assert response.outcome == T.TOOL_OUTCOME_EXECUTOR_ERROR
    assert "webhook destination localhost resolves to" in response.error_message
    assert "a loopback address" in response.error_message
    assert receiver.requests == []


class MapResolver(AbstractResolver):
    """Names to fixed addresses, as a DNS server controlled by a tenant would answer."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        return [
            ResolveResult(
                hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0
            )
            for ip in self.names[host]
        ]

    async def close(self) -> None:
        return None


async def test_a_name_with_any_private_answer_is_refused(receiver: Receiver) -> None:
    # The first answer is the receiver itself: were the rule skipped for
    # names, the call would reach it (and only it; tests talk to 127.0.0.1
    # alone). That a public first answer does not help is in test_addresses.
    resolver = MapResolver({"rebind.acme.test": ["127.0.0.1", "10.0.0.5"]})
    client = WebhookClient(resolver=resolver)
    try:
        url = f"http://rebind.acme.test:{receiver.port}/echo"
        tools = config([webhook("lookup_order", url)], allow=())
        async with grpc_stub(servicer(tools, client)) as stub:
            response = await execute(stub, "lookup_order", ORDER)
    finally:
        await client.close()
    assert resolver.lookups == ["rebind.acme.test"]
    assert error_message(response) == (
        "The webhook 'lookup_order' was not called: webhook destination rebind.acme.test "
        "resolves to 127.0.0.1, a loopback address."
    )
    assert receiver.requests == []


async def test_the_connection_goes_to_the_vetted_address(receiver: Receiver) -> None:
    # tools.acme.test exists in no DNS: reaching the receiver proves the
    # connector used exactly the addresses the guarded resolver returned.
    resolver = MapResolver({"tools.acme.test": ["127.0.0.1"]})
    client = WebhookClient(resolver=resolver)
    try:
        url = f"http://tools.acme.test:{receiver.port}/echo"
        tools = config([webhook("lookup_order", url)], allow=("tools.acme.test",))
        async with grpc_stub(servicer(tools, client)) as stub:
            response = await execute(stub, "lookup_order", ORDER)
    finally:
        await client.close()
    assert response.outcome == T.TOOL_OUTCOME_OK, response.error_message
    assert receiver.requests[0].headers["Host"] == f"tools.acme.test:{receiver.port}"
    assert resolver.lookups == ["tools.acme.test"]


# --- tenants ------------------------------------------------------------------


async def test_tenants_never_see_or_run_each_others_webhooks(
    receiver: Receiver, webhooks: WebhookClient
) -> None:
    globex = {
        "builtins": ["calculate"],
        "webhooks": [
            {
                "name": "ship",
                "description": "ship an order",
                "url": receiver.url("/echo"),
                "secret_env": "GLOBEX_SECRET",
            }
        ],
    }
    tools = config([webhook("lookup_order", receiver.url("/echo"))], globex=globex)
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        assert await listed(stub, "acme") == ["calculate", "current_time", "lookup_order"]
        assert await listed(stub, "globex") == ["calculate", "ship"]
        assert await listed(stub, "initech") == []
        stolen = await execute(stub, "lookup_order", ORDER, tenant="globex")
        nowhere = await execute(stub, "launch_rockets", {}, tenant="globex")
        not_allowed = await execute(stub, "current_time", {}, tenant="globex")
        other_way = await execute(stub, "ship", {}, tenant="acme")
    # Another tenant's webhook is indistinguishable from a tool that does not exist.
    assert stolen.outcome == nowhere.outcome == other_way.outcome == T.TOOL_OUTCOME_UNKNOWN_TOOL
    assert stolen.error_code == C.ERROR_CODE_TOOL_NOT_FOUND
    assert stolen.error_message == "No tool named 'lookup_order' is registered."
    assert not_allowed.outcome == T.TOOL_OUTCOME_NOT_ALLOWED
    assert not_allowed.error_code == C.ERROR_CODE_TOOL_NOT_ALLOWED
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"order_id": 5}, "Field 'order_id' must be a string, got a number."),
        ({}, "Missing required field 'order_id'."),
        ({"order_id": "a", "lines": [{"qty": 1}]}, "Missing required field 'lines[0].sku'."),
        (
            {"order_id": "a", "lines": [{"sku": "s", "qty": "two"}]},
            "Field 'lines[0].qty' must be an integer, got a string.",
        ),
    ],
)
async def test_invalid_arguments_name_the_json_path_and_never_reach_the_webhook(
    receiver: Receiver, webhooks: WebhookClient, arguments: dict[str, Any], expected: str
) -> None:
    tools = config([webhook("lookup_order", receiver.url("/echo"))])
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        response = await execute(stub, "lookup_order", arguments)
    assert response.outcome == T.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert error_message(response) == expected
    assert receiver.requests == []


async def test_secrets_stay_out_of_logs_errors_and_reprs(
    receiver: Receiver, webhooks: WebhookClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="switchboard")
    tools = config(
        [
            webhook("lookup_order", receiver.url("/echo")),
            webhook("broken", receiver.url("/fail")),
            webhook("private", "http://10.0.0.5/"),
        ],
        allow=("127.0.0.1",),
    )
    async with grpc_stub(servicer(tools, webhooks)) as stub:
        responses = [
            await execute(stub, name, ORDER) for name in ("lookup_order", "broken", "private")
        ]
    assert [r.outcome for r in responses] == [
        T.TOOL_OUTCOME_OK,
        T.TOOL_OUTCOME_EXECUTOR_ERROR,
        T.TOOL_OUTCOME_EXECUTOR_ERROR,
    ]
    assert tools.tenants is not None
    spec = tools.tenants["acme"].webhooks[0]
    assert SECRET not in caplog.text
    assert SECRET not in repr(tools) + repr(spec) + str(spec.secret)
    assert all(SECRET not in r.output for r in responses)
    assert spec.secret.reveal() == SECRET
