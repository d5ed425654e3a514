"""`GET /v1/usage`: the calling tenant's requests, tokens and cost, by UTC day and
model (docs/tenants.md#usage-and-cost). A tenant key sees its own tenant only;
`ek_` secrets, made for browsers, are refused.

Query: `since` and `until` (YYYY-MM-DD, UTC; default the last 30 days).
"""

from __future__ import annotations

import datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from switchboard.errors import SwitchboardError, invalid_value
from switchboard.gateway import handshake
from switchboard.gateway.resources import Resources
from switchboard.limits.ledger import UsageLedger, report_window, usd


async def usage_endpoint(request: Request) -> Response:
    gateway: Resources = request.app.state.gateway
    try:
        tenant = handshake.tenant_of_key(gateway.tenants.current, request.headers)
        query = request.query_params
        try:
            since, until = report_window(
                query.get("since"), query.get("until"), datetime.datetime.now(datetime.UTC).date()
            )
        except ValueError as exc:
            raise invalid_value("since", f"Invalid report window: {exc}.") from None
        rows = await UsageLedger(gateway.redis).report(tenant.id, since, until)
    except SwitchboardError as error:
        gateway.refusals.info("request refused", code=error.name, path=request.url.path)
        return handshake.error_response(error)
    budget = tenant.money_budget
    return JSONResponse(
        {
            "object": "list",
            "tenant": tenant.id,
            "since": since.isoformat(),
            "until": until.isoformat(),
            "data": [row.to_json() for row in rows],
            "total_cost_usd": usd(sum(row.cost_pusd for row in rows)),
            "budgets": {
                "daily_usd": usd(budget.daily) if budget and budget.daily is not None else None,
                "monthly_usd": (
                    usd(budget.monthly) if budget and budget.monthly is not None else None
                ),
            },
        }
    )
