"""The gate every connection and response of a tenant passes at the gateway:
its limits on connections, responses and tokens.

(The broker has its own, different admission control: a fair queue per
upstream that sheds load, `switchboard.broker.admission`.)

Every check is one atomic script in Redis (`switchboard.limits`), so the limits
hold however many gateway replicas serve a tenant:

- a connection holds a `connections` slot (leased, renewed while it lives);
- a response counts against `requests_per_minute`, holds a `responses` slot,
  and reserves its prompt estimate plus its maximum output against
  `tokens_per_minute` and the daily budget *before* the upstream call; the
  reservation is settled to the real usage when the response ends, so
  concurrent responses cannot overshoot a budget by more than one response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from switchboard.errors import SwitchboardError
from switchboard.limits import TenantLimiter
from switchboard.limits.ledger import AudioTokens, UsageLedger, cost_of, largest_cost, usd
from switchboard.tenancy import Tenant
from switchboard.tenancy.prices_section import Price
from switchboard.v1 import common_pb2

log = logging.getLogger(__name__)

# Shares of a money budget past which a warning is logged (once per crossing).
BUDGET_WARNINGS = (0.5, 0.8, 0.9, 1.0)

CONNECTION_LEASE_S = 60.0
# A response's slot is renewed while the response runs (`keep_response`) and
# released when it ends; a gateway that dies frees its slots within this.
RESPONSE_LEASE_S = 60.0


@dataclass(frozen=True, slots=True)
class Admitted:
    """A response that passed admission; `finish` it exactly once."""

    response_id: str
    holds_reservation: bool
    holds_slot: bool
    holds_money: bool = False


class TenantGate:
    def __init__(
        self,
        limiter: TenantLimiter,
        *,
        reserve_output_tokens: int,
        ledger: UsageLedger | None = None,
        prices: Callable[[], Mapping[str, Price]] = dict,
    ) -> None:
        """Args:
        limiter: the shared limits store.
        reserve_output_tokens: reserved for a response's output when neither the
            response nor the tenant caps it.
        ledger: where usage and costs are recorded and money budgets kept
            (None: nowhere, and money budgets are not enforced).
        prices: the current price table (the tenants file's `prices:`).
        """
        self.limiter = limiter
        self.reserve_output_tokens = reserve_output_tokens
        self.ledger = ledger
        self.prices = prices

    def price_of(self, tenant: Tenant, model: str, upstream_model: str = "") -> Price | None:
        """The price of a response of `model` served as `upstream_model` (by default
        the model's first deployment's): the upstream model's, else the model's."""
        table = self.prices()
        if not upstream_model:
            try:
                upstream_model = tenant.route(model).upstream_model
            except SwitchboardError:
                upstream_model = model
        return table.get(upstream_model) or table.get(model)

    async def open_connection(self, tenant: Tenant, holder: str) -> None:
        """Take a connection slot, or raise `rate_limit_exceeded` with retry_after."""
        limit = tenant.limits.concurrent_connections
        if limit is None:
            return
        decision = await self.limiter.acquire(
            tenant.id, "connections", holder, limit=limit, lease_s=CONNECTION_LEASE_S
        )
        if not decision.allowed:
            raise decision.error(f"Too many open connections (limit {limit}).")

    async def keep_connection(self, tenant: Tenant, holder: str) -> None:
        if tenant.limits.concurrent_connections is not None:
            await self.limiter.renew(tenant.id, "connections", holder, lease_s=CONNECTION_LEASE_S)

    async def hold_connection(self, tenant: Tenant, holder: str, extra: Mapping[str, str]) -> None:
        """Renew a connection's slot every `CONNECTION_LEASE_S` / 3 until cancelled;
        a failure is logged (with `extra`) once per outage, and the next renewal
        tries again."""
        failing = False
        while True:
            await asyncio.sleep(CONNECTION_LEASE_S / 3)
            try:
                await self.keep_connection(tenant, holder)
            except SwitchboardError as exc:
                if not failing:
                    log.warning("connection slot not renewed", extra={**extra, "code": exc.name})
                failing = True
            else:
                failing = False

    async def close_connection(self, tenant: Tenant, holder: str) -> None:
        if tenant.limits.concurrent_connections is not None:
            await self.limiter.release(tenant.id, "connections", holder)

    async def admit_response(
        self,
        tenant: Tenant,
        response_id: str,
        *,
        prompt_tokens: int,
        max_output_tokens: int,
        price: Price | None = None,
    ) -> Admitted:
        """Admit a response, or raise the error to fail it with.

        Args:
            price: the response's model's price, for the money budgets.

        Raises:
            RateLimitExceeded: requests, concurrent responses or tokens per minute.
            QuotaExceeded: the daily token budget, or a money budget.
            LimitsStoreUnavailable: Redis does not answer (fail closed).
        """
        limits = tenant.limits
        if limits.requests_per_minute is not None:
            decision = await self.limiter.admit_request(
                tenant.id, per_minute=limits.requests_per_minute
            )
            if not decision.allowed:
                raise decision.error(
                    f"Rate limit reached: {limits.requests_per_minute} responses per minute."
                )
        holds_slot = False
        if limits.concurrent_responses is not None:
            decision = await self.limiter.acquire(
                tenant.id,
                "responses",
                response_id,
                limit=limits.concurrent_responses,
                lease_s=RESPONSE_LEASE_S,
            )
            if not decision.allowed:
                raise decision.error(
                    f"Too many responses at once (limit {limits.concurrent_responses})."
                )
            holds_slot = True
        reserved = 0
        if limits.tokens_per_minute is not None or tenant.daily_token_budget is not None:
            reserved = prompt_tokens + (max_output_tokens or self.reserve_output_tokens)
            try:
                decision = await self.limiter.reserve_tokens(
                    tenant.id,
                    response_id,
                    reserved,
                    per_minute=limits.tokens_per_minute,
                    per_day=tenant.daily_token_budget,
                )
            except SwitchboardError:
                await self._release(tenant, response_id, holds_slot)
                raise
            if not decision.allowed:
                await self._release(tenant, response_id, holds_slot)
                raise decision.error("Not enough tokens left for this response.")
        budget = tenant.money_budget
        holds_money = False
        if budget is not None and self.ledger is not None:
            output = max_output_tokens or self.reserve_output_tokens
            try:
                await self.ledger.reserve(
                    tenant.id,
                    response_id,
                    largest_cost(prompt_tokens, output, price),
                    daily=budget.daily,
                    monthly=budget.monthly,
                )
            except SwitchboardError:
                if reserved > 0:
                    await self.limiter.settle_tokens(tenant.id, response_id, 0)
                await self._release(tenant, response_id, holds_slot)
                raise
            holds_money = True
        return Admitted(response_id, reserved > 0, holds_slot, holds_money)

    @staticmethod
    def output_cap(tenant: Tenant, requested: int) -> int:
        """A response's output tokens: what was asked (0 = no limit), within the
        tenant's `max_output_tokens`."""
        limit = tenant.limits.max_output_tokens
        if limit is None:
            return requested
        return min(requested, limit) if requested else limit

    def adopt(self, tenant: Tenant, response_id: str) -> Admitted:
        """The admission of a response another gateway started and died running:
        finishing it settles that gateway's token reservation and frees its slot
        (both idempotent, and no-ops when it held none)."""
        limits = tenant.limits
        reserves = limits.tokens_per_minute is not None or tenant.daily_token_budget is not None
        return Admitted(response_id, reserves, limits.concurrent_responses is not None)

    async def keep_response(self, tenant: Tenant, admitted: Admitted) -> None:
        """Renew a running response's slot (every `RESPONSE_LEASE_S` / 3 or so)."""
        if admitted.holds_slot:
            await self.limiter.renew(
                tenant.id, "responses", admitted.response_id, lease_s=RESPONSE_LEASE_S
            )

    async def finish_response(self, tenant: Tenant, admitted: Admitted, used_tokens: int) -> None:
        """Settle the reservation to what was used and free the response slot."""
        if admitted.holds_reservation:
            await self.limiter.settle_tokens(tenant.id, admitted.response_id, used_tokens)
        await self._release(tenant, admitted.response_id, admitted.holds_slot)

    async def record_cost(
        self,
        tenant: Tenant,
        session_id: str,
        response_id: str,
        model: str,
        usage: common_pb2.Usage,
        price: Price | None,
        audio: AudioTokens | None = None,
    ) -> int:
        """Record a finished response's usage and cost (settling its money
        reservation), and warn when the tenant's spending crosses a share of a
        money budget. `audio`: the audio share of `usage`, at the audio prices.

        Returns:
            The response's cost in pico-dollars.

        Raises:
            LimitsStoreUnavailable: Redis does not answer (nothing recorded).
        """
        cost = cost_of(usage, price, audio)
        if self.ledger is None:
            return cost
        spent = await self.ledger.settle(tenant.id, session_id, response_id, model, usage, cost)
        budget = tenant.money_budget
        if budget is not None:
            for period, limit, after in (
                ("daily", budget.daily, spent.day),
                ("monthly", budget.monthly, spent.month),
            ):
                crossed = [
                    share
                    for share in BUDGET_WARNINGS
                    if limit and after - cost < share * limit <= after
                ]
                if crossed:
                    log.warning(
                        "money budget threshold crossed",
                        extra={
                            "tenant_id": tenant.id,
                            "budget": period,
                            "share": crossed[-1],
                            "spent_usd": round(usd(after), 6),
                            "budget_usd": round(usd(limit or 0), 6),
                        },
                    )
        return cost

    async def _release(self, tenant: Tenant, response_id: str, holds_slot: bool) -> None:
        if holds_slot:
            await self.limiter.release(tenant.id, "responses", response_id)

    async def rate_limits(self, tenant: Tenant) -> list[dict[str, Any]] | None:
        """The `rate_limits` of a `rate_limits.updated` event; None without limits."""
        limits = tenant.limits
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return None
        state = await self.limiter.usage(
            tenant.id,
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
        )
        return state.to_event()
