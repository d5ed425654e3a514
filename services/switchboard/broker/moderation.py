"""`switchboard.v1.ModerationService`: the tenants' moderation checks, at their upstream.

Served by the broker beside `BrokerService`, because the broker holds the
upstream keys. A check POSTs the texts to the tenant's moderation upstream
(`moderation.upstream` of the tenants file; an OpenAI-compatible
`/v1/moderations`) with its model, and answers each text's verdict. A check
that cannot be made aborts with the upstream error codes (`upstream_timeout`,
`upstream_rate_limited`, `upstream_error`), whose messages name the upstream,
never its URL or key; the gateway then fails closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import orjson

from switchboard.errors import SwitchboardError, abort_with
from switchboard.tenancy import LiveTenants
from switchboard.v1 import common_pb2, moderation_pb2, moderation_pb2_grpc

log = logging.getLogger(__name__)

# A moderation answer is a few kilobytes per text; more is not a moderation answer.
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_INPUTS = 32

_C = common_pb2


class ModerationServicer(moderation_pb2_grpc.ModerationServiceServicer):
    """Checks texts for the tenants of `tenants`, with one HTTP session."""

    def __init__(self, tenants: LiveTenants, http: aiohttp.ClientSession) -> None:
        self._tenants = tenants
        self._http = http

    def register(self, server: grpc.aio.Server) -> None:
        moderation_pb2_grpc.add_ModerationServiceServicer_to_server(self, server)

    async def Moderate(
        self, request: moderation_pb2.ModerateRequest, context: grpc.aio.ServicerContext
    ) -> moderation_pb2.ModerateResponse:
        try:
            return await self.moderate(request)
        except SwitchboardError as error:
            await abort_with(context, error)
            raise  # unreachable: abort raises

    async def moderate(
        self, request: moderation_pb2.ModerateRequest
    ) -> moderation_pb2.ModerateResponse:
        """The verdicts of `request.input`, in order.

        Raises:
            SwitchboardError: an unknown tenant, too many texts, or the upstream failed.
        """
        directory = self._tenants.current
        tenant = directory.get(request.tenant_id)
        if tenant is None:
            raise SwitchboardError("Unknown tenant.", code=_C.ERROR_CODE_PERMISSION_DENIED)
        if not 1 <= len(request.input) <= MAX_INPUTS:
            raise SwitchboardError(
                f"A check takes 1 to {MAX_INPUTS} texts.", code=_C.ERROR_CODE_INVALID_VALUE
            )
        policy = tenant.moderation
        upstream = directory.upstreams.get(policy.upstream)
        if upstream is None:
            raise SwitchboardError(
                f"The moderation upstream {policy.upstream!r} is not configured.",
                code=_C.ERROR_CODE_UPSTREAM_ERROR,
            )
        headers = {"Content-Type": "application/json"}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key.reveal()}"
        body = orjson.dumps({"model": policy.model, "input": list(request.input)})
        url = upstream.base_url.rstrip("/") + "/moderations"
        name = upstream.name
        try:
            async with asyncio.timeout(policy.timeout_s):
                async with self._http.post(url, data=body, headers=headers) as response:
                    raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
                    status = response.status
        except TimeoutError:
            raise SwitchboardError(
                f"The moderation upstream {name!r} did not answer within {policy.timeout_s:g} s.",
                code=_C.ERROR_CODE_UPSTREAM_TIMEOUT,
            ) from None
        except aiohttp.ClientError as exc:
            raise SwitchboardError(
                f"The moderation upstream {name!r} could not be reached ({type(exc).__name__}).",
                code=_C.ERROR_CODE_UPSTREAM_ERROR,
            ) from None
        if status != 200:
            code = (
                _C.ERROR_CODE_UPSTREAM_RATE_LIMITED
                if status == 429
                else _C.ERROR_CODE_UPSTREAM_ERROR
            )
            raise SwitchboardError(
                f"The moderation upstream {name!r} answered HTTP {status}.", code=code
            )
        results = _results(raw, len(request.input), name)
        return moderation_pb2.ModerateResponse(results=results, model=policy.model)


def _results(raw: bytes, count: int, name: str) -> list[moderation_pb2.ModerationResult]:
    bad = SwitchboardError(
        f"The moderation upstream {name!r} sent an answer that is not a moderation result.",
        code=_C.ERROR_CODE_UPSTREAM_ERROR,
    )
    if len(raw) > MAX_RESPONSE_BYTES:
        raise bad
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad from None
    entries = body.get("results") if isinstance(body, dict) else None
    if not isinstance(entries, list) or len(entries) != count:
        raise bad
    results = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("flagged"), bool):
            raise bad
        categories = entry.get("categories")
        flagged = (
            [str(k)[:64] for k, v in categories.items() if v is True]
            if isinstance(categories, dict)
            else []
        )
        results.append(
            moderation_pb2.ModerationResult(flagged=entry["flagged"], categories=sorted(flagged))
        )
    return results


@asynccontextmanager
async def moderation_service(tenants: LiveTenants) -> AsyncIterator[ModerationServicer]:
    """A servicer with its HTTP session, closed when the block ends."""
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, auto_decompress=True
    ) as http:
        yield ModerationServicer(tenants, http)
