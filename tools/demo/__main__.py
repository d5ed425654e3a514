"""`python -m tools.demo`: serve the demo page (see server.py)."""

from __future__ import annotations

import argparse
import logging
import os

from aiohttp import web

from tools.demo.server import DemoSettings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="The Switchboard demo page.")
    parser.add_argument(
        "--gateway",
        action="append",
        help="a gateway's http://host:port (repeat for replicas; default 127.0.0.1:8080)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    key = os.environ.get("SWITCHBOARD_DEMO_TENANT_KEY", "")
    if not key:
        parser.error("set SWITCHBOARD_DEMO_TENANT_KEY to the tenant key that mints secrets")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = DemoSettings(tuple(args.gateway or ["http://127.0.0.1:8080"]), key)
    web.run_app(create_app(settings), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
