"""What a tenant is: its keys, models, tools, limits and session defaults.

These are plain frozen values built by the tenants file parser
(`switchboard.tenancy.tenants_file`) or by the development fallbacks in
`switchboard.tenancy.directory`. None of them prints a secret: upstream API
keys are `Secret`s, and key hashes and instructions stay out of reprs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from switchboard.config import Secret
from switchboard.errors import SwitchboardError
from switchboard.tenancy.mcp_section import McpServer
from switchboard.tenancy.moderation_section import ModerationPolicy
from switchboard.tenancy.summary_section import SummaryPolicy
from switchboard.v1 import common_pb2

DEFAULT_TIER = "standard"
DEFAULT_UPSTREAM = "default"
# What an upstream speaks: Chat Completions streaming, or the Realtime WebSocket protocol.
UPSTREAM_KINDS = ("chat", "realtime")


class ModelNotAllowed(SwitchboardError):
    """A tenant asked for a model its configuration does not route."""

    code = common_pb2.ERROR_CODE_MODEL_NOT_ALLOWED


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tenant limits; None means unlimited.

    Attributes:
        requests_per_minute: responses a tenant may start per minute.
        tokens_per_minute: input plus output tokens per minute.
        concurrent_connections: open WebSockets at once.
        concurrent_responses: responses generating at once.
        max_session_seconds: longest a connection may stay open.
        max_output_tokens: ceiling on any one response's output tokens.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_connections: int | None = None
    concurrent_responses: int | None = None
    max_session_seconds: int | None = None
    max_output_tokens: int | None = None

    def configured(self) -> dict[str, int]:
        """The limits that are set, by name (for summaries and logs)."""
        values = ((item.name, getattr(self, item.name)) for item in fields(self))
        return {name: value for name, value in values if value is not None}


LIMIT_NAMES: tuple[str, ...] = tuple(item.name for item in fields(Limits))


@dataclass(frozen=True, slots=True)
class MoneyBudget:
    """A tenant's budgets in money, in pico-dollars (None: no such budget)."""

    daily: int | None = None
    monthly: int | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream deployment that can serve a model, and how it is chosen.

    Attributes:
        upstream: the name of the `Upstream` to call.
        upstream_model: the model name sent to it.
        weight: share of the calls among deployments of the same priority.
        priority: deployments with the lowest number are tried first; the
            others only when those fail or their circuit breakers are open.
    """

    upstream: str
    upstream_model: str
    weight: int = 1
    priority: int = 0


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """Where a model name a client sends goes.

    Attributes:
        name: the model name clients send (`session.model`).
        upstream: the name of the `Upstream` of the first deployment.
        upstream_model: the model name sent to that upstream.
        deployments: every deployment that serves the model, as listed; just
            `(upstream, upstream_model)` when none is given.
    """

    name: str
    upstream: str
    upstream_model: str
    deployments: tuple[Deployment, ...] = ()

    def __post_init__(self) -> None:
        if not self.deployments:
            object.__setattr__(
                self, "deployments", (Deployment(self.upstream, self.upstream_model),)
            )


@dataclass(frozen=True, slots=True)
class UpstreamAdmission:
    """Admission control of one upstream; None leaves the broker's default.

    Attributes:
        max_concurrent: calls streaming from the upstream at once.
        max_queued: calls waiting for a slot, all tenants together.
        max_queued_per_tenant: calls one tenant may have waiting.
        queue_timeout_s: the longest a call waits for a slot.
    """

    max_concurrent: int | None = None
    max_queued: int | None = None
    max_queued_per_tenant: int | None = None
    queue_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class UpstreamBreaker:
    """Circuit breaker of one upstream; None leaves the broker's default.

    Attributes:
        failures: consecutive failed calls that open the breaker.
        cooldown_s: how long it stays open before one probe call is let through.
    """

    failures: int | None = None
    cooldown_s: float | None = None


@dataclass(frozen=True, slots=True)
class UpstreamRollover:
    """Session rollover of a `kind: realtime` upstream (docs/voice.md#session-rollover).

    Attributes:
        session_limit_s: how long the upstream keeps a Realtime session open
            (OpenAI: 3600); None: no limit known, no rollover.
        margin_s: how long before that limit the broker starts looking for a
            moment between turns to open the next session.
    """

    session_limit_s: float | None = None
    margin_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """An OpenAI-compatible deployment the broker may call.

    Attributes:
        name: the name routes refer to (`default` when a model names none).
        base_url: an http(s) URL without credentials, query or fragment.
        kind: `chat` (Chat Completions streaming) or `realtime` (the Realtime
            WebSocket protocol at `{base_url}/realtime`, for voice sessions).
        api_key: the key sent upstream; empty when the upstream needs none.
        api_key_env: the variable the key was read from (safe to log).
        admission: its concurrency limit and wait queue (broker defaults if unset).
        circuit_breaker: when the broker stops sending to it for a while.
        rollover: when a voice session moves to a new upstream session.
    """

    name: str
    base_url: str
    api_key: Secret = field(default=Secret(""), repr=False)
    api_key_env: str | None = None
    admission: UpstreamAdmission = UpstreamAdmission()
    circuit_breaker: UpstreamBreaker = UpstreamBreaker()
    kind: str = "chat"
    rollover: UpstreamRollover = UpstreamRollover()


@dataclass(frozen=True, slots=True)
class SessionDefaults:
    """Settings applied to a tenant's new sessions; None leaves the service default.

    Attributes:
        model: the model of a session that names none (one of the tenant's models).
        instructions: the system instructions of a session that sets none.
        max_output_tokens: per-response output tokens when the client sets none.
    """

    model: str | None = None
    instructions: str | None = field(default=None, repr=False)
    max_output_tokens: int | None = None


def _no_models() -> Mapping[str, ModelRoute]:
    return MappingProxyType({})


def _no_servers() -> Mapping[str, McpServer]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Tenant:
    """One customer of the deployment. `Tenant("acme")` alone may use nothing.

    Attributes:
        id: the tenant id; goes on spans, logs and Redis keys, never on metrics.
        tier: a label from a small configured set; safe as a metric label.
        key_hashes: SHA-256 hex digests of the tenant's API keys.
        models: the models the tenant may use, by the name clients send.
        builtins: the server-side built-in tools it may use (toolexec checks names).
        webhooks: its webhook tool definitions, as written (toolexec checks them).
        limits: rate, concurrency and size limits.
        daily_token_budget: tokens per UTC day; None is unlimited.
        session: defaults for new sessions.
        money_budget: daily and monthly budgets in money; None is unlimited.
        mcp_servers: the remote MCP servers its clients may use, by label.
        moderation: how its text is moderated (off by default).
        summaries: whether old turns are summarised rather than dropped.
        any_model_upstream: development tenants only: a model not in `models`
            is allowed too, and goes to this upstream under its own name.
        all_builtins: development tenants only: every built-in tool is allowed.
    """

    id: str
    tier: str = DEFAULT_TIER
    key_hashes: frozenset[str] = field(default=frozenset(), repr=False)
    models: Mapping[str, ModelRoute] = field(default_factory=_no_models)
    builtins: tuple[str, ...] = ()
    webhooks: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)
    limits: Limits = Limits()
    daily_token_budget: int | None = None
    session: SessionDefaults = SessionDefaults()
    money_budget: MoneyBudget | None = None
    mcp_servers: Mapping[str, McpServer] = field(default_factory=_no_servers, repr=False)
    moderation: ModerationPolicy = field(default_factory=ModerationPolicy)
    summaries: SummaryPolicy = field(default_factory=SummaryPolicy)
    any_model_upstream: str | None = None
    all_builtins: bool = False

    def route(self, name: str) -> ModelRoute:
        """Where the model clients call `name` goes for this tenant.

        Raises:
            ModelNotAllowed: the tenant may not use `name` (code
                `model_not_allowed`, param `model`); safe to send to the client.
        """
        route = self.models.get(name)
        if route is not None:
            return route
        if self.any_model_upstream is not None and name:
            return ModelRoute(name, self.any_model_upstream, name)
        raise ModelNotAllowed(
            f"The model '{name[:128]}' does not exist or you do not have access to it.",
            param="model",
        )

    def allows_builtin(self, name: str) -> bool:
        """Whether the tenant may use the built-in tool `name`."""
        return self.all_builtins or name in self.builtins
