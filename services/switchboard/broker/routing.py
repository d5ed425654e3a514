"""Where a model call goes: the tenant's route to its deployments (pure, no I/O).

`resolve` reads one `TenantDirectory` snapshot: the request's tenant must be
configured, the model must be one the tenant may use, and the route names the
upstream deployments that serve it and the model sent to each.
`SWITCHBOARD_BROKER_UPSTREAM_MODEL` (`model_override`), a development
convenience, replaces only that last part: the tenant must still be allowed
the model it asked for. `order` puts the deployments in the order one call
tries them: by priority, then shuffled by weight.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchboard.errors import InternalError, InvalidRequest, SwitchboardError
from switchboard.tenancy import ModelRoute, Tenant, TenantDirectory, Upstream
from switchboard.v1 import common_pb2


class UnknownTenant(SwitchboardError):
    """The call names a tenant the broker's tenants configuration does not have."""

    code = common_pb2.ERROR_CODE_PERMISSION_DENIED


class UnsupportedFeature(SwitchboardError):
    """The model is served by an upstream that does not speak what the call needs."""

    code = common_pb2.ERROR_CODE_UNSUPPORTED_FEATURE


_OTHER_KIND = {
    "chat": "The model '{model}' is a voice model: use it in a Realtime session (docs/voice.md).",
    "realtime": "The model '{model}' is not a voice model: it has no Realtime upstream.",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One deployment a call may go to.

    Attributes:
        upstream: the deployment to call (its key is a `Secret`).
        model: the model name sent to it.
        weight: its share among candidates of the same priority.
        priority: lower is tried first.
    """

    upstream: Upstream
    model: str
    weight: int = 1
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    """The resolved destinations of one call.

    Attributes:
        tenant: the calling tenant.
        route: the tenant's route for the requested model.
        candidates: the route's deployments, as configured (see `order`).
    """

    tenant: Tenant
    route: ModelRoute
    candidates: tuple[Candidate, ...]

    @property
    def upstream(self) -> Upstream:
        """The preferred deployment: the first listed of the lowest priority."""
        return self._preferred.upstream

    @property
    def model(self) -> str:
        """The model sent to the preferred deployment."""
        return self._preferred.model

    @property
    def _preferred(self) -> Candidate:
        return min(self.candidates, key=lambda candidate: candidate.priority)


def resolve(
    directory: TenantDirectory,
    tenant_id: str,
    model: str,
    *,
    model_override: str | None = None,
    kind: str = "chat",
) -> Target:
    """The deployments and upstream models of `tenant_id`'s call to `model`.

    Args:
        directory: the tenants in force (take `LiveTenants.current` once per call).
        tenant_id: the tenant the gateway authenticated.
        model: the model name the client asked for.
        model_override: when set, sent to every deployment instead of the route's model.
        kind: the kind of upstream the caller speaks to (`chat` or `realtime`).

    Raises:
        InvalidRequest: no model is named (`missing_required_parameter`).
        UnknownTenant: the tenant is not configured (`permission_denied`).
        ModelNotAllowed: the tenant may not use `model` (`model_not_allowed`).
        UnsupportedFeature: the model is served by an upstream of another kind
            (`unsupported_feature`, param `model`).
        InternalError: the route names an upstream the directory lacks (the
            tenants file parser rules this out).
    """
    if not model:
        raise InvalidRequest(
            "The request names no model.",
            code=common_pb2.ERROR_CODE_MISSING_REQUIRED_PARAMETER,
            param="model",
        )
    tenant = directory.get(tenant_id)
    if tenant is None:
        # The id is the gateway's, not a secret; cut it short all the same.
        raise UnknownTenant(f"The tenant {tenant_id[:64]!r} is not configured on this deployment.")
    route = tenant.route(model)
    candidates = []
    for deployment in route.deployments:
        upstream = directory.upstreams.get(deployment.upstream)
        if upstream is None:
            raise InternalError("The model's upstream is not configured.")
        if upstream.kind != kind:
            raise UnsupportedFeature(_OTHER_KIND[kind].format(model=model[:128]), param="model")
        candidates.append(
            Candidate(
                upstream,
                model_override or deployment.upstream_model,
                deployment.weight,
                deployment.priority,
            )
        )
    return Target(tenant, route, tuple(candidates))


def order(
    candidates: Sequence[Candidate], draw: Callable[[], float] = random.random
) -> list[Candidate]:
    """The order in which one call tries `candidates`.

    Lower priorities first; within a priority a weighted shuffle, so each
    candidate comes first with a probability proportional to its weight
    (Efraimidis-Spirakis: sort by `u ** (1 / weight)`, u uniform in [0, 1)).

    Args:
        candidates: a target's candidates.
        draw: uniform numbers in [0, 1); tests pass a fixed sequence.
    """
    keyed = [(c.priority, -(draw() ** (1.0 / c.weight)), i, c) for i, c in enumerate(candidates)]
    return [candidate for *_, candidate in sorted(keyed, key=lambda item: item[:3])]
