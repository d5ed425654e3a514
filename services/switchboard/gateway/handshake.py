"""Who is connecting, and with which session settings: credentials and refusals
at the door, before a socket is accepted or a request is served.

Browsers send an ephemeral `ek_` secret as the WebSocket subprotocol
`openai-insecure-api-key.<secret>` (as OpenAI's endpoint takes it); servers send
a tenant key or an `ek_` secret as a bearer token. A tenant key is never
accepted from the subprotocol: it would mean a long-lived key sits in a browser.
A refusal is answered with the error's HTTP status and an OpenAI-style body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from switchboard.config import GatewaySettings
from switchboard.errors import AuthenticationFailed, InvalidRequest, SwitchboardError
from switchboard.gateway import bounds, client_secrets
from switchboard.gateway.client_secrets import ClientSecrets, Grant
from switchboard.tenancy import Tenant, TenantDirectory
from switchboard.v1 import common_pb2, session_pb2

# The browser subprotocol that carries a credential.
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def subprotocol_key(subprotocols: list[str]) -> str | None:
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL) :] or None
    return None


def tenant_of_key(tenants: TenantDirectory, headers: Mapping[str, str]) -> Tenant:
    """The tenant whose key is the request's bearer token (HTTP endpoints)."""
    key = bearer_token(headers.get("authorization"))
    tenant = tenants.authenticate(key) if key else None
    if tenant is None:
        raise AuthenticationFailed("Missing or invalid API key.")
    return tenant


async def authenticate(
    websocket: HTTPConnection, tenants: TenantDirectory, secrets: ClientSecrets
) -> tuple[Tenant, Grant | None]:
    """The tenant (and ephemeral grant) behind a handshake's (or an HTTP
    request's) credential.

    Raises:
        AuthenticationFailed: no credential, or one that is unknown or expired.
    """
    from_browser = subprotocol_key(websocket.scope.get("subprotocols") or [])
    key = from_browser or bearer_token(websocket.headers.get("authorization"))
    if key and key.startswith(client_secrets.PREFIX):
        grant = await secrets.redeem(key)
        tenant = tenants.get(grant.tenant_id) if grant else None
        if grant is not None and tenant is not None:
            return tenant, grant
        raise AuthenticationFailed("Invalid or expired client secret.")
    if from_browser:
        raise AuthenticationFailed(
            "Only ephemeral client secrets (ek_...) may be sent as a subprotocol."
        )
    tenant = tenants.authenticate(key) if key else None
    if tenant is None:
        raise AuthenticationFailed("Missing or invalid API key.")
    return tenant, None


def new_session_config(
    settings: GatewaySettings, tenant: Tenant, model: str | None
) -> session_pb2.SessionConfig:
    """A new session's settings: the tenant's defaults, then the requested model."""
    defaults = tenant.session
    return session_pb2.SessionConfig(
        model=model or defaults.model or settings.default_model,
        instructions=defaults.instructions or "",
        max_output_tokens=defaults.max_output_tokens or 0,
        tool_choice="auto",
    )


def session_config(
    settings: GatewaySettings, tenant: Tenant, grant: Grant | None, requested: str | None
) -> session_pb2.SessionConfig:
    """The settings a connection opens its session with: the grant's, when it
    came with an ephemeral secret (which fixes the model), else the tenant's
    defaults and the requested model. The tenant must be allowed the model.

    Raises:
        InvalidRequest: `field_locked` for another model than the grant's,
            `value_too_large` or `invalid_value` for a model name over its
            limit or with other than printable ASCII.
        SwitchboardError: `model_not_allowed`.
    """
    if requested:
        bounds.check_model(requested, "model")
    if grant is None:
        config = new_session_config(settings, tenant, requested)
    else:
        config = grant.config
        check_grant_model(grant, requested or config.model)
    tenant.route(config.model)
    return config


def check_grant_model(grant: Grant, model: str) -> None:
    """An ephemeral secret opens sessions of its own model only."""
    if model != grant.config.model:
        raise InvalidRequest(
            f"This client secret is for model '{grant.config.model}'.",
            code=common_pb2.ERROR_CODE_FIELD_LOCKED,
            param="model",
        )


def error_response(error: SwitchboardError) -> JSONResponse:
    """The error's HTTP status and an OpenAI-style JSON body."""
    headers = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    if error.spec.http_status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error.to_http_body(), status_code=error.spec.http_status, headers=headers)


async def deny(websocket: WebSocket, error: SwitchboardError) -> None:
    """Refuse a WebSocket handshake before it upgrades."""
    await websocket.send_denial_response(error_response(error))


async def json_object(
    request: Request,
    max_bytes: int = bounds.MAX_BODY_BYTES,
    timeout_s: float = bounds.BODY_TIMEOUT_S,
) -> dict[str, Any]:
    """An HTTP request's JSON object body, within the body, time and depth bounds.

    Raises:
        InvalidRequest: `frame_too_large` (413) for a body over `max_bytes`,
            `invalid_json`, `json_too_deep`, or `invalid_value` for JSON that
            is not an object.
        SwitchboardError: `idle_timeout` (408) for a body that takes longer
            than `timeout_s` to arrive.
    """
    too_large = InvalidRequest(
        f"The request body is larger than {max_bytes} bytes.",
        code=common_pb2.ERROR_CODE_FRAME_TOO_LARGE,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise SwitchboardError(
            f"The request body did not arrive within {timeout_s:g} s.",
            code=common_pb2.ERROR_CODE_IDLE_TIMEOUT,
        ) from None
    return bounds.loads_object(bytes(body), "request body")
