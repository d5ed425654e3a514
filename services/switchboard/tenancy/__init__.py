"""Tenants: who may connect, with which keys, to which models, within which limits.

The tenants file (docs/tenants.md) is the source of truth in production:
`load_tenants(environ)` reads `SWITCHBOARD_TENANTS_FILE` into a live
`LiveTenants` whose `current` `TenantDirectory` authenticates API keys and
routes models, and which reloads when the file changes. Without a file, the
older `SWITCHBOARD_TENANT_KEYS` variable gives development tenants that may use
everything.

API keys are never stored: configuration holds the SHA-256 of each key.
`python -m switchboard.tenancy new-key TENANT` makes one, and
`python -m switchboard.tenancy check FILE` validates a tenants file.
"""

from switchboard.tenancy.directory import (
    TENANT_KEYS_VARIABLE,
    TenantDirectory,
    environment_upstream,
)
from switchboard.tenancy.keys import KEY_PREFIX, TENANT_ID, hash_key, new_key
from switchboard.tenancy.live import (
    TENANTS_FILE_VARIABLE,
    LiveTenants,
    load_tenants,
)
from switchboard.tenancy.mcp_section import McpServer
from switchboard.tenancy.moderation_section import ModerationPolicy
from switchboard.tenancy.tenants import (
    DEFAULT_TIER,
    DEFAULT_UPSTREAM,
    Deployment,
    Limits,
    ModelNotAllowed,
    ModelRoute,
    SessionDefaults,
    Tenant,
    Upstream,
    UpstreamAdmission,
    UpstreamBreaker,
    UpstreamRollover,
)

__all__ = [
    "DEFAULT_TIER",
    "DEFAULT_UPSTREAM",
    "KEY_PREFIX",
    "TENANTS_FILE_VARIABLE",
    "TENANT_ID",
    "TENANT_KEYS_VARIABLE",
    "Deployment",
    "Limits",
    "LiveTenants",
    "McpServer",
    "ModelNotAllowed",
    "ModelRoute",
    "ModerationPolicy",
    "SessionDefaults",
    "Tenant",
    "TenantDirectory",
    "Upstream",
    "UpstreamAdmission",
    "UpstreamBreaker",
    "UpstreamRollover",
    "environment_upstream",
    "hash_key",
    "load_tenants",
    "new_key",
]
