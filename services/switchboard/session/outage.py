"""How a Redis outage leaves the session store: as `SessionStoreUnavailable`.

Every method of `SessionStore` and `EventLog` that talks to Redis is wrapped in
`store_call`, so a caller sees one retryable error (with a one-second
`retry_after`) whatever redis-py raised, and the redis-py error as its cause.
"""

from __future__ import annotations

from switchboard.errors import SessionStoreUnavailable
from switchboard.redis_client import translate_outage

UNAVAILABLE_MESSAGE = "The session store is unavailable."

store_call = translate_outage(lambda: SessionStoreUnavailable(UNAVAILABLE_MESSAGE, retry_after=1.0))
