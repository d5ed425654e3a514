"""Webhook tools: a tenant's HTTP endpoint called as a function tool.

A call POSTs the validated arguments as compact JSON to the webhook's URL:

    POST <url>
    Content-Type: application/json
    X-Switchboard-Tenant: acme
    X-Switchboard-Call-Id: call_abc123
    X-Switchboard-Tool: lookup_order
    X-Switchboard-Signature: t=1719835200,v1=5f0c…   (see `signing`)

A 2xx answer is the result: its body parsed as JSON, or, when it is not
JSON, given to the model as a JSON string (an empty body is `null`). Anything
else is an EXECUTOR_ERROR whose message is safe for the model and logs: a
non-2xx status is named with at most 200 characters of the body and never a
header; a body longer than `max_response_bytes` is refused after reading at
most that many bytes; redirects are not followed; a compressed body is
refused (we ask for none, and a decompressed size is what the cap protects).
Requests are never retried: a webhook may have side effects, and idempotency
by call_id is toolexec's job (a receiver can also dedupe on
`X-Switchboard-Call-Id`).

`WebhookClient` owns the one `aiohttp.ClientSession` of the process. Build it
in the running loop at start and `close()` it at shutdown. Its connector
resolves names through `addresses.GuardedResolver`, so only vetted public
addresses (or allow-listed hosts) are ever contacted; it keeps no cookies,
so one tenant's webhook can never set a cookie another tenant's call sends,
and ignores proxy variables from the environment.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from switchboard.toolexec.addresses import AddressGuard, DestinationRefused, GuardedResolver
from switchboard.toolexec.registry import CallInfo, Tool, ToolFailed
from switchboard.toolexec.signing import SIGNATURE_HEADER, signature_header
from switchboard.toolexec.tools_config import MAX_TIMEOUT_S, WebhookSpec
from switchboard.toolexec.validation import parse_json

log = logging.getLogger(__name__)

USER_AGENT = "switchboard-toolexec"
# How much of an error body may be quoted to the model, and how much is read to find it.
MAX_ERROR_SNIPPET_CHARS = 200
_ERROR_READ_BYTES = 1024
_READ_CHUNK_BYTES = 64 * 1024
# Header values are sent verbatim when they are printable ASCII, percent-encoded otherwise.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


class WebhookClient:
    """Sends webhook calls over one shared, guarded aiohttp session.

    Must be built inside the running event loop.

    Args:
        guard: the address rule; its allow-list is replaced on each tools-file
            load (`guard.allow_private`). A guard with an empty allow-list by default.
        resolver: the lookup behind the guard; the system resolver by default.
        clock: Unix time for signatures; tests pin it.
    """

    def __init__(
        self,
        *,
        guard: AddressGuard | None = None,
        resolver: AbstractResolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.guard = guard if guard is not None else AddressGuard()
        self._clock = clock
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.guard, resolver),
            # Every new connection is resolved and vetted again, under the
            # allow-list in force; a cached answer would skip both.
            use_dns_cache=False,
            # Each webhook's max_concurrency bounds its connections.
            limit=0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            # A backstop only: the servicer's per-tool timeout fires first.
            timeout=aiohttp.ClientTimeout(total=MAX_TIMEOUT_S + 5),
            headers={"User-Agent": USER_AGENT},
        )

    async def close(self) -> None:
        """Close the session and its connections; the client is unusable after."""
        await self._session.close()

    def tool(self, spec: WebhookSpec) -> Tool:
        """The `Tool` that calls `spec` through this client."""
        return Tool(
            name=spec.name,
            description=spec.description,
            parameters=spec.parameters,
            executor=functools.partial(self.call, spec),
            timeout_s=spec.timeout_s,
            max_concurrency=spec.max_concurrency,
        )

    async def call(self, spec: WebhookSpec, arguments: dict[str, Any], call: CallInfo) -> Any:
        """POST one call to the webhook and return its result.

        Returns:
            The 2xx body as parsed JSON, else as a string; None for an empty body.

        Raises:
            ToolFailed: the destination is refused, cannot be reached, answered
                non-2xx, compressed, or more than `max_response_bytes`.
        """
        url = URL(spec.url)
        fields: dict[str, Any] = {
            "tenant_id": call.tenant_id,
            "call_id": call.call_id,
            "tool": spec.name,
            "host": url.host,
        }
        try:
            self.guard.check_literal(url.raw_host or "")
        except DestinationRefused as exc:
            raise _refused(spec, exc, fields) from None
        body = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Switchboard-Tenant": _header_value(call.tenant_id),
            "X-Switchboard-Call-Id": _header_value(call.call_id),
            "X-Switchboard-Tool": spec.name,
            SIGNATURE_HEADER: signature_header(spec.secret.reveal(), body, now=self._clock()),
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                fields["status"] = response.status
                result = await _answer(spec, response)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise _refused(spec, exc.os_error, fields) from None
            raise _unreachable(spec, "its host name could not be resolved", exc, fields) from None
        except aiohttp.ClientConnectorError as exc:
            raise _unreachable(spec, "the connection failed", exc, fields) from None
        except aiohttp.ClientError as exc:
            raise _unreachable(spec, "the request failed", exc, fields) from None
        except ToolFailed:
            log.warning("webhook call failed", extra={**fields, **_since(started)})
            raise
        log.debug("webhook answered", extra={**fields, **_since(started)})
        return result


async def _answer(spec: WebhookSpec, response: aiohttp.ClientResponse) -> Any:
    if not 200 <= response.status < 300:
        snippet = _snippet(await _read_up_to(response, _ERROR_READ_BYTES))
        response.close()
        detail = f": {snippet}" if snippet else ""
        raise ToolFailed(f"The webhook {spec.name!r} answered HTTP {response.status}{detail}")
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        response.close()
        raise ToolFailed(
            f"The webhook {spec.name!r} answered with a compressed body; "
            "webhooks must answer without Content-Encoding."
        )
    cap = spec.max_response_bytes
    declared = response.content_length
    if declared is not None and declared > cap:
        response.close()
        raise _too_large(spec)
    body = await _read_up_to(response, cap + 1)
    if len(body) > cap:
        # Closing drops the connection instead of draining the rest of the body.
        response.close()
        raise _too_large(spec)
    return _result(body)


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body; stops reading there."""
    body = bytearray()
    while len(body) < limit:
        chunk = await response.content.read(min(limit - len(body), _READ_CHUNK_BYTES))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _result(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return parse_json(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", errors="replace")


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    # One line of printable text: the snippet goes into a message and a log line.
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > MAX_ERROR_SNIPPET_CHARS:
        text = text[:MAX_ERROR_SNIPPET_CHARS] + "…"
    return text


def _too_large(spec: WebhookSpec) -> ToolFailed:
    return ToolFailed(
        f"The webhook {spec.name!r} sent a response larger than {spec.max_response_bytes} bytes."
    )


def _refused(spec: WebhookSpec, exc: OSError, fields: dict[str, Any]) -> ToolFailed:
    log.warning("webhook destination refused", extra={**fields, "reason": str(exc)})
    return ToolFailed(f"The webhook {spec.name!r} was not called: {exc}.")


def _unreachable(
    spec: WebhookSpec, reason: str, exc: Exception, fields: dict[str, Any]
) -> ToolFailed:
    # The type, not str(exc): aiohttp's messages quote the URL, which may hold a token.
    log.warning("webhook unreachable", extra={**fields, "error_type": type(exc).__name__})
    return ToolFailed(f"The webhook {spec.name!r} could not be reached: {reason}.")


def _header_value(text: str) -> str:
    return quote(text, safe=_HEADER_SAFE + " ")


def _since(started: float) -> dict[str, int]:
    return {"duration_ms": round((time.monotonic() - started) * 1000)}
