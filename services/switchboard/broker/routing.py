"""Where a model call goes: the tenant's route to an upstream (pure, no I/O).

`resolve` reads one `TenantDirectory` snapshot: the request's tenant must be
configured, the model must be one the tenant may use, and the route names the
upstream deployment and the model sent to it. `SWITCHBOARD_BROKER_UPSTREAM_MODEL`
(`model_override`), a development convenience, replaces only that last part:
the tenant must still be allowed the model it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.errors import InternalError, InvalidRequest, SwitchboardError
from switchboard.tenancy import ModelRoute, Tenant, TenantDirectory, Upstream
from switchboard.v1 import common_pb2


class UnknownTenant(SwitchboardError):
    """The call names a tenant the broker's tenants configuration does not have."""

    code = common_pb2.ERROR_CODE_PERMISSION_DENIED


@dataclass(frozen=True, slots=True)
class Target:
    """The resolved destination of one call.

    Attributes:
        tenant: the calling tenant.
        route: the tenant's route for the requested model.
        upstream: the deployment to call (its key is a `Secret`).
        model: the model name sent upstream.
    """

    tenant: Tenant
    route: ModelRoute
    upstream: Upstream
    model: str


def resolve(
    directory: TenantDirectory,
    tenant_id: str,
    model: str,
    *,
    model_override: str | None = None,
) -> Target:
    """The upstream and upstream model of `tenant_id`'s call to `model`.

    Args:
        directory: the tenants in force (take `TenantConfig.current` once per call).
        tenant_id: the tenant the gateway authenticated.
        model: the model name the client asked for.
        model_override: when set, sent upstream instead of the route's model.

    Raises:
        InvalidRequest: no model is named (`missing_required_parameter`).
        UnknownTenant: the tenant is not configured (`permission_denied`).
        ModelNotAllowed: the tenant may not use `model` (`model_not_allowed`).
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
    upstream = directory.upstreams.get(route.upstream)
    if upstream is None:
        raise InternalError("The model's upstream is not configured.")
    return Target(tenant, route, upstream, model_override or route.upstream_model)
