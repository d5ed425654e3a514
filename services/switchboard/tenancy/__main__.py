"""`python -m switchboard.tenancy`: make tenant keys, check tenants files.

new-key TENANT      print a fresh API key once, and the line to configure its hash
check [--no-env] FILE
                    validate a tenants file and print a summary without secrets;
                    exit 1 with the one-line error when it is invalid
usage TENANT [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--json]
                    the tenant's requests, tokens and cost by UTC day and model,
                    from the Redis at SWITCHBOARD_REDIS_URL (docs/tenants.md#usage-and-cost)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import TextIO

import orjson

from switchboard.config import DEFAULT_REDIS_URL, ConfigError, Env
from switchboard.errors import SwitchboardError
from switchboard.limits.ledger import UsageLedger, report_window, usd
from switchboard.redis_client import any_client
from switchboard.tenancy.directory import TenantDirectory
from switchboard.tenancy.keys import TENANT_ID, hash_key, new_key
from switchboard.tenancy.tenants import Deployment, UpstreamAdmission, UpstreamBreaker


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on misuse)."""
    parser = argparse.ArgumentParser(prog="python -m switchboard.tenancy")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("new-key", help="create a tenant API key")
    create.add_argument("tenant", help="tenant id")
    check = sub.add_parser("check", help="validate a tenants file")
    check.add_argument("file", help="the tenants YAML file")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="do not require the api_key_env variables to be set (e.g. in CI)",
    )
    usage = sub.add_parser("usage", help="a tenant's tokens, requests and cost by day and model")
    usage.add_argument("tenant", help="tenant id")
    usage.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    usage.add_argument("--until", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    if args.command == "usage":
        if not TENANT_ID.fullmatch(args.tenant):
            parser.error(f"tenant id must match {TENANT_ID.pattern}")
        try:
            window = report_window(
                args.since, args.until, datetime.datetime.now(datetime.UTC).date()
            )
        except ValueError as exc:
            parser.error(str(exc))
        return asyncio.run(print_usage(args.tenant, window, args.json, sys.stdout))
    if args.command == "new-key":
        if not TENANT_ID.fullmatch(args.tenant):
            parser.error(f"tenant id must match {TENANT_ID.pattern}")
        print_new_key(args.tenant, sys.stdout)
        return 0
    try:
        directory = TenantDirectory.load(args.file, require_env=not args.no_env)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print_summary(directory, sys.stdout)
    return 0


async def print_usage(
    tenant_id: str, window: tuple[datetime.date, datetime.date], as_json: bool, out: TextIO
) -> int:
    """Print the tenant's usage rows and a total; 1 when Redis does not answer."""
    try:
        env = Env(os.environ)
        url = env.url(
            "SWITCHBOARD_REDIS_URL", DEFAULT_REDIS_URL, schemes=("redis", "rediss", "unix")
        )
        redis = any_client(url, cluster=env.boolean("SWITCHBOARD_REDIS_CLUSTER", False))
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    try:
        rows = await UsageLedger(redis).report(tenant_id, *window)
    except SwitchboardError as exc:
        print(f"unavailable: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    if as_json:
        out.write(orjson.dumps([row.to_json() for row in rows]).decode() + "\n")
        return 0
    out.write(
        f"{'date':<10}  {'model':<24} {'requests':>8} {'input':>10} {'cached':>10} "
        f"{'output':>10} {'cost_usd':>14}\n"
    )
    for row in rows:
        out.write(
            f"{row.day:<10}  {row.model[:24]:<24} {row.requests:>8} {row.input_tokens:>10} "
            f"{row.cached_input_tokens:>10} {row.output_tokens:>10} {usd(row.cost_pusd):>14.6f}\n"
        )
    total = sum(row.cost_pusd for row in rows)
    estimated = sum(row.estimated for row in rows)
    out.write(f"total {usd(total):.6f} USD over {sum(r.requests for r in rows)} responses")
    out.write(f" ({estimated} with estimated usage)\n" if estimated else "\n")
    return 0


def print_new_key(tenant_id: str, out: TextIO) -> None:
    """Print a new key and the tenants-file line holding its hash."""
    key = new_key()
    digest = hash_key(key)
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    out.write(
        f"key: {key}\n"
        f"# Give this key to tenant {tenant_id} now: only its hash is configured,\n"
        "# so it cannot be shown again. Add this line under "
        f"tenants.{tenant_id}.keys in the tenants file:\n"
        f'- "{digest}"  # created {today}\n'
        f"# (without a tenants file: SWITCHBOARD_TENANT_KEYS={tenant_id}={digest})\n"
    )


def print_summary(directory: TenantDirectory, out: TextIO) -> None:
    """Print what a directory holds: names, routes and limits; never keys or instructions."""
    out.write(f"ok: {directory.source}\n")
    out.write(f"upstreams ({len(directory.upstreams)}):\n")
    for upstream in directory.upstreams.values():
        key = f"key from ${upstream.api_key_env}" if upstream.api_key_env else "no key"
        if upstream.api_key_env and not upstream.api_key:
            key += ", not set here"
        out.write(f"  {upstream.name}: {upstream.base_url} ({key})\n")
        for name, settings in (
            ("admission", upstream.admission),
            ("circuit_breaker", upstream.circuit_breaker),
        ):
            if configured := _configured(settings):
                out.write(f"    {name}: {', '.join(configured)}\n")
        rollover = upstream.rollover
        if rollover.session_limit_s is not None:
            out.write(
                f"    rollover: session_limit_s={rollover.session_limit_s:g}, "
                f"margin_s={rollover.margin_s:g}\n"
            )
    out.write(f"tenants ({len(directory)}), tiers: {', '.join(directory.tiers)}\n")
    for tenant in directory:
        out.write(f"  {tenant.id}: tier {tenant.tier}, {len(tenant.key_hashes)} key(s)\n")
        for route in tenant.models.values():
            targets = ", ".join(_deployment(d) for d in route.deployments)
            out.write(f"    model {route.name} -> {targets}\n")
        if tenant.any_model_upstream is not None:
            out.write(f"    any model -> {tenant.any_model_upstream}\n")
        builtins = "all" if tenant.all_builtins else ", ".join(tenant.builtins) or "none"
        out.write(f"    builtins: {builtins}; webhooks: {len(tenant.webhooks)}\n")
        limits = [f"{name}={value}" for name, value in tenant.limits.configured().items()]
        if tenant.daily_token_budget is not None:
            limits.append(f"daily_token_budget={tenant.daily_token_budget}")
        out.write(f"    limits: {', '.join(limits) or 'none'}\n")
    if directory.allow_private_hosts:
        out.write(f"allow_private_hosts: {', '.join(directory.allow_private_hosts)}\n")


def _deployment(deployment: Deployment) -> str:
    text = f"{deployment.upstream}: {deployment.upstream_model}"
    if deployment.weight != 1:
        text += f" weight {deployment.weight}"
    if deployment.priority:
        text += f" priority {deployment.priority}"
    return text


def _configured(settings: UpstreamAdmission | UpstreamBreaker) -> list[str]:
    """`name=value` of the settings a file sets (the rest are the broker's defaults)."""
    values = ((item.name, getattr(settings, item.name)) for item in fields(settings))
    return [f"{name}={value:g}" for name, value in values if value is not None]


if __name__ == "__main__":
    sys.exit(main())
