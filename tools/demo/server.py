"""The demo page's server: the page, the TypeScript SDK's build, and `ek_` secrets.

`make run` starts it (http://127.0.0.1:8081/). The page talks to the gateway
itself, through the SDK (clients/js/dist), with an ephemeral `ek_` secret it
asks this server for (`POST /token`); this server mints it with the tenant key,
which never leaves it. Only for a machine's own browser: it listens on
127.0.0.1 and mints a secret for whoever asks.

    python -m tools.demo --gateway http://127.0.0.1:8080 --port 8081
    (the key from SWITCHBOARD_DEMO_TENANT_KEY)
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

ROOT = Path(__file__).resolve().parents[2]
STATIC = Path(__file__).with_name("static")
SDK_DIST = ROOT / "clients" / "js" / "dist"
# How long a minted secret lives: the SDK asks again before it expires.
SECRET_SECONDS = 600

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Where the gateways are, and the tenant key the secrets are minted with.

    Attributes:
        gateway_urls: each gateway replica's http://host:port (the first mints).
        tenant_key: never sent to the browser nor logged.
        model: the session's model.
    """

    gateway_urls: tuple[str, ...]
    tenant_key: str
    model: str = "gpt-realtime"

    def __repr__(self) -> str:
        return f"DemoSettings(gateway_urls={self.gateway_urls}, model={self.model!r})"

    @property
    def websocket_urls(self) -> list[str]:
        return [f"ws{url.removeprefix('http')}/v1/realtime" for url in self.gateway_urls]


def create_app(settings: DemoSettings) -> web.Application:
    """The demo's aiohttp application."""
    app = web.Application(middlewares=[_security_headers(settings)])
    app["settings"] = settings
    app.cleanup_ctx.append(_http_client)
    app.router.add_get("/", _page)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/config.json", _config)
    app.router.add_post("/token", _token)
    app.router.add_static("/static/", STATIC)
    app.router.add_static("/sdk/", SDK_DIST)
    return app


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        app["http"] = session
        yield


def _security_headers(settings: DemoSettings) -> Middleware:
    # Nothing outside this server and the gateways: no CDN, no inline script.
    sockets = " ".join(settings.websocket_urls)
    policy = (
        f"default-src 'self'; connect-src 'self' {sockets}; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Content-Security-Policy"] = policy
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return middleware


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _config(request: web.Request) -> web.Response:
    settings: DemoSettings = request.app["settings"]
    return web.json_response({"urls": settings.websocket_urls, "model": settings.model})


async def _token(request: web.Request) -> web.Response:
    """Mint an `ek_` secret for the page; answer only its value and expiry."""
    settings: DemoSettings = request.app["settings"]
    http: aiohttp.ClientSession = request.app["http"]
    body = {
        "expires_after": {"anchor": "created_at", "seconds": SECRET_SECONDS},
        "session": {"type": "realtime", "model": settings.model},
    }
    try:
        async with http.post(
            f"{settings.gateway_urls[0]}/v1/realtime/client_secrets",
            data=json.dumps(body),
            headers={
                "Authorization": f"Bearer {settings.tenant_key}",
                "Content-Type": "application/json",
            },
        ) as answer:
            minted = await answer.json(content_type=None)
            status = answer.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("no secret minted: %s", type(exc).__name__)
        return web.json_response({"error": "gateway_unreachable"}, status=502)
    if status != 200 or not isinstance(minted, dict):
        log.warning("no secret minted: the gateway answered %s", status)
        return web.json_response({"error": "mint_refused", "status": status}, status=502)
    return web.json_response({"value": minted["value"], "expires_at": minted["expires_at"]})
