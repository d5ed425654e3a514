"""Settings: loaded once at start from the environment, validated, passed explicitly.

Each service has a frozen dataclass built by `from_environ(environ)`; tests pass
a dict instead of patching `os.environ`. Variables are named
`SWITCHBOARD_<SERVICE>_<NAME>` (shared ones `SWITCHBOARD_<NAME>`), and a bad
value fails start-up with a `ConfigError` that names the variable. Secrets are
held in `Secret`, which never prints itself. docs/configuration.md lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A secret string that shows as `Secret('***')` in logs, reprs and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Env:
    """Typed reads from an environment mapping; errors name the variable."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def string(self, key: str, default: str) -> str:
        value = self._environ.get(key)
        return default if value is None or value == "" else value

    def optional(self, key: str) -> str | None:
        value = self._environ.get(key)
        return value if value else None

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        raw = self._environ.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{key} must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self._environ.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")
        return value

    def address(self, key: str, default: str) -> str:
        value = self.string(key, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
        return value

    def address_or_off(self, key: str, default: str) -> str:
        """`address`, or "" when the variable is `off` (an endpoint that may be disabled)."""
        if self.string(key, "") == "off":
            return ""
        return self.address(key, default)

    def url(self, key: str, default: str, *, schemes: tuple[str, ...]) -> str:
        value = self.string(key, default)
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            # Name the variable but not the value: a URL may carry a password.
            raise ConfigError(f"{key} must be a {'/'.join(schemes)} URL")
        return value

    def log_level(self) -> str:
        value = self.string("SWITCHBOARD_LOG_LEVEL", "INFO").upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"SWITCHBOARD_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {value!r}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self._environ.get(key)
        if raw is None or raw == "":
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")

    def secret(self, key: str) -> Secret | None:
        value = self._environ.get(key)
        return Secret(value) if value else None


DEFAULT_SESSION_ADDRESS = "127.0.0.1:50051"
DEFAULT_BROKER_ADDRESS = "127.0.0.1:50052"
DEFAULT_TOOLEXEC_ADDRESS = "127.0.0.1:50053"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MODEL = "gpt-realtime"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str
    port: int
    session_target: str
    broker_target: str
    toolexec_target: str
    default_model: str
    # Text frames larger than this get a `frame_too_large` error and are dropped.
    max_event_bytes: int
    # Frames larger than this close the connection with 1009 (the transport cap).
    max_frame_bytes: int
    # Bytes of server events one connection may have waiting for a slow client
    # (deltas merged meanwhile) before it is closed with 4008 slow_consumer.
    max_buffered_bytes: int
    # SO_SNDBUF of client sockets; 0 leaves the kernel's autotuning (up to MiBs).
    send_buffer_bytes: int
    # Deadline of unary calls to the backends.
    rpc_timeout_s: float
    # Deadline of one server-side tool call (toolexec enforces each tool's own).
    tool_timeout_s: float
    # Server-side tool rounds one turn may take before the loop stops.
    max_tool_rounds: int
    # Redis for ephemeral client secrets and tenant limits.
    redis_url: Secret
    # SWITCHBOARD_REDIS_CLUSTER: the URL names a node of a Redis Cluster.
    redis_cluster: bool
    # Output tokens reserved for a response whose output is not capped, until its
    # real usage is known (only for tenants with token limits).
    reserve_output_tokens: int
    # A response whose client left without cancelling runs on (and is recorded
    # for a resume) this long at most.
    disconnect_grace_s: float
    # A connection with no client event and no response for this long is closed
    # with 4010 idle_timeout; 0 never.
    idle_timeout_s: float
    # WebSocket ping every interval; a client that does not answer within the
    # timeout is dropped (1011). 0 turns the heartbeat off.
    ping_interval_s: float
    ping_timeout_s: float
    # On SIGTERM, how long running responses may take to finish before the
    # remaining connections are closed with 1012.
    drain_timeout_s: float
    # From the TCP connect to the end of a request head (HTTP or WebSocket
    # handshake): a client slower than this gets 408 and is closed.
    handshake_timeout_s: float
    # The writer lease of a session: how long a gateway that stopped renewing it
    # (killed) keeps its sessions from being resumed elsewhere.
    session_lease_s: float
    # 0: every event is recorded in the session's log before it is sent. Above
    # 0: deltas go out at once and are recorded at checkpoints this far apart
    # (docs/protocol.md, Resume; gateway/sender.py).
    checkpoint_s: float
    # Refuse new work (`server_busy`) while the event loop runs this late,
    # smoothed over a second (gateway/overload.py); 0 never refuses.
    shed_loop_lag_s: float
    log_level: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        env = Env(environ)
        max_event = env.integer("SWITCHBOARD_GATEWAY_MAX_EVENT_BYTES", 256 * 1024, minimum=1024)
        max_frame = env.integer(
            "SWITCHBOARD_GATEWAY_MAX_FRAME_BYTES", 4 * 1024 * 1024, minimum=1024
        )
        if max_frame < max_event:
            raise ConfigError(
                "SWITCHBOARD_GATEWAY_MAX_FRAME_BYTES must be >= SWITCHBOARD_GATEWAY_MAX_EVENT_BYTES"
            )
        return cls(
            host=env.string("SWITCHBOARD_GATEWAY_HOST", "127.0.0.1"),
            port=env.integer("SWITCHBOARD_GATEWAY_PORT", 8080, maximum=65535),
            session_target=env.address(
                "SWITCHBOARD_GATEWAY_SESSION_TARGET", DEFAULT_SESSION_ADDRESS
            ),
            broker_target=env.address("SWITCHBOARD_GATEWAY_BROKER_TARGET", DEFAULT_BROKER_ADDRESS),
            toolexec_target=env.address(
                "SWITCHBOARD_GATEWAY_TOOLEXEC_TARGET", DEFAULT_TOOLEXEC_ADDRESS
            ),
            default_model=env.string("SWITCHBOARD_GATEWAY_DEFAULT_MODEL", DEFAULT_MODEL),
            max_event_bytes=max_event,
            max_frame_bytes=max_frame,
            max_buffered_bytes=env.integer(
                "SWITCHBOARD_GATEWAY_MAX_BUFFERED_BYTES", 1024 * 1024, minimum=16 * 1024
            ),
            send_buffer_bytes=env.integer("SWITCHBOARD_GATEWAY_SEND_BUFFER_BYTES", 0),
            rpc_timeout_s=env.number("SWITCHBOARD_GATEWAY_RPC_TIMEOUT_S", 5.0, minimum=0.1),
            tool_timeout_s=env.number("SWITCHBOARD_GATEWAY_TOOL_TIMEOUT_S", 65.0, minimum=0.1),
            max_tool_rounds=env.integer("SWITCHBOARD_GATEWAY_MAX_TOOL_ROUNDS", 8, minimum=0),
            redis_url=Secret(
                env.url(
                    "SWITCHBOARD_REDIS_URL", DEFAULT_REDIS_URL, schemes=("redis", "rediss", "unix")
                )
            ),
            redis_cluster=env.boolean("SWITCHBOARD_REDIS_CLUSTER", False),
            reserve_output_tokens=env.integer(
                "SWITCHBOARD_GATEWAY_RESERVE_OUTPUT_TOKENS", 4096, minimum=1
            ),
            disconnect_grace_s=env.number("SWITCHBOARD_GATEWAY_DISCONNECT_GRACE_S", 30.0),
            idle_timeout_s=env.number("SWITCHBOARD_GATEWAY_IDLE_TIMEOUT_S", 900.0),
            ping_interval_s=env.number("SWITCHBOARD_GATEWAY_PING_INTERVAL_S", 20.0),
            ping_timeout_s=env.number("SWITCHBOARD_GATEWAY_PING_TIMEOUT_S", 20.0, minimum=0.1),
            drain_timeout_s=env.number("SWITCHBOARD_GATEWAY_DRAIN_TIMEOUT_S", 25.0),
            handshake_timeout_s=env.number(
                "SWITCHBOARD_GATEWAY_HANDSHAKE_TIMEOUT_S", 10.0, minimum=0.1
            ),
            session_lease_s=env.number("SWITCHBOARD_GATEWAY_SESSION_LEASE_S", 10.0, minimum=0.5),
            checkpoint_s=env.number("SWITCHBOARD_GATEWAY_CHECKPOINT_S", 0.0, minimum=0.0),
            shed_loop_lag_s=env.number("SWITCHBOARD_GATEWAY_SHED_LOOP_LAG_MS", 250.0, minimum=0.0)
            / 1000,
            log_level=env.log_level(),
        )


@dataclass(frozen=True, slots=True)
class SessionSettings:
    listen: str
    # HOST:PORT of the /metrics HTTP endpoint; "off" turns it off.
    metrics_listen: str
    redis_url: Secret
    # SWITCHBOARD_REDIS_CLUSTER: the URL names a node of a Redis Cluster.
    redis_cluster: bool
    # Idle sessions (and their items) expire after this long.
    session_ttl_s: int
    # Budget of the context sent to the model when a call does not set one.
    context_tokens: int
    log_level: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SessionSettings:
        env = Env(environ)
        redis_url = env.url(
            "SWITCHBOARD_REDIS_URL", DEFAULT_REDIS_URL, schemes=("redis", "rediss", "unix")
        )
        return cls(
            listen=env.address("SWITCHBOARD_SESSION_LISTEN", DEFAULT_SESSION_ADDRESS),
            metrics_listen=env.address_or_off(
                "SWITCHBOARD_SESSION_METRICS_LISTEN", "127.0.0.1:9101"
            ),
            redis_url=Secret(redis_url),
            redis_cluster=env.boolean("SWITCHBOARD_REDIS_CLUSTER", False),
            session_ttl_s=env.integer("SWITCHBOARD_SESSION_TTL_S", 24 * 3600, minimum=60),
            context_tokens=env.integer("SWITCHBOARD_SESSION_CONTEXT_TOKENS", 16_000, minimum=64),
            log_level=env.log_level(),
        )


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    listen: str
    # HOST:PORT of the /metrics HTTP endpoint; "off" turns it off.
    metrics_listen: str
    # The development `default` upstream (any OpenAI-compatible base URL, e.g.
    # https://api.openai.com/v1, and its key), validated at start. Calls are
    # routed by the tenants (switchboard.tenancy): without a tenants file the
    # development tenants' `default` upstream is built from these same
    # variables (`environment_upstream`); with one, the file's upstreams apply.
    upstream_base_url: str
    upstream_api_key: Secret
    # When set, sent upstream instead of every routed upstream model (a
    # development convenience, e.g. a realtime model name mapped to a chat
    # model); the tenant must still be allowed the model it asked for.
    upstream_model: str | None
    connect_timeout_s: float
    # Longest silence allowed between two chunks of an upstream stream.
    read_timeout_s: float
    log_level: str
    # Admission control of each upstream whose tenants file entry sets none
    # (docs/broker.md#admission-control): slots, waiting calls, the wait.
    max_concurrent: int = 64
    max_queued: int = 256
    max_queued_per_tenant: int = 32
    queue_timeout_s: float = 10.0
    # Retries and failover before the first token: attempts in all, the
    # backoff's first and longest step, and the call's deadline for them.
    retry_attempts: int = 3
    retry_backoff_s: float = 0.25
    retry_backoff_max_s: float = 4.0
    retry_deadline_s: float = 15.0
    # Circuit breaker of each upstream whose tenants file entry sets none.
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    # A call whose caller went away without Cancel (its gateway died) runs on
    # this long from then, for an Attach; then it is cancelled.
    orphan_grace_s: float = 60.0
    # Text and tool arguments a call may have produced and still be attached
    # to (its transcript is held up to this); past it, an orphan is cancelled.
    attach_max_bytes: int = 4 * 1024 * 1024
    # HOST:PORT the gateways reach this broker at, sent with every call as the
    # `switchboard-broker` metadata; by default the listen address, "" when
    # that names no dialable address (a wildcard host, port 0).
    advertise_address: str = ""
    # A voice session whose gateway went away without closing it is held this
    # long for a resume, and keeps up to this many bytes of its newest events
    # (output audio dropped first) to replay (docs/voice.md#resume).
    voice_hold_s: float = 30.0
    voice_replay_max_bytes: int = 8 * 1024 * 1024

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> BrokerSettings:
        env = Env(environ)
        key = env.secret("SWITCHBOARD_BROKER_UPSTREAM_API_KEY") or env.secret("OPENAI_API_KEY")
        default_url = env.string("OPENAI_BASE_URL", "https://api.openai.com/v1")
        listen = env.address("SWITCHBOARD_BROKER_LISTEN", DEFAULT_BROKER_ADDRESS)
        advertise = reachable(listen)
        if env.optional("SWITCHBOARD_BROKER_ADVERTISE_ADDRESS"):
            advertise = env.address("SWITCHBOARD_BROKER_ADVERTISE_ADDRESS", advertise)
        return cls(
            listen=listen,
            metrics_listen=env.address_or_off(
                "SWITCHBOARD_BROKER_METRICS_LISTEN", "127.0.0.1:9102"
            ),
            upstream_base_url=env.url(
                "SWITCHBOARD_BROKER_UPSTREAM_URL", default_url, schemes=("http", "https")
            ),
            upstream_api_key=key or Secret(""),
            upstream_model=env.optional("SWITCHBOARD_BROKER_UPSTREAM_MODEL"),
            connect_timeout_s=env.number("SWITCHBOARD_BROKER_CONNECT_TIMEOUT_S", 5.0, minimum=0.1),
            read_timeout_s=env.number("SWITCHBOARD_BROKER_READ_TIMEOUT_S", 60.0, minimum=0.1),
            log_level=env.log_level(),
            max_concurrent=env.integer("SWITCHBOARD_BROKER_MAX_CONCURRENT", 64, minimum=1),
            max_queued=env.integer("SWITCHBOARD_BROKER_MAX_QUEUED", 256),
            max_queued_per_tenant=env.integer("SWITCHBOARD_BROKER_MAX_QUEUED_PER_TENANT", 32),
            queue_timeout_s=env.number("SWITCHBOARD_BROKER_QUEUE_TIMEOUT_S", 10.0, minimum=0.01),
            retry_attempts=env.integer("SWITCHBOARD_BROKER_RETRY_ATTEMPTS", 3, minimum=1),
            retry_backoff_s=env.number("SWITCHBOARD_BROKER_RETRY_BACKOFF_S", 0.25, minimum=0.001),
            retry_backoff_max_s=env.number(
                "SWITCHBOARD_BROKER_RETRY_BACKOFF_MAX_S", 4.0, minimum=0.001
            ),
            retry_deadline_s=env.number("SWITCHBOARD_BROKER_RETRY_DEADLINE_S", 15.0, minimum=0.1),
            breaker_failures=env.integer("SWITCHBOARD_BROKER_BREAKER_FAILURES", 5, minimum=1),
            breaker_cooldown_s=env.number(
                "SWITCHBOARD_BROKER_BREAKER_COOLDOWN_S", 30.0, minimum=0.01
            ),
            orphan_grace_s=env.number("SWITCHBOARD_BROKER_ORPHAN_GRACE_S", 60.0),
            attach_max_bytes=env.integer(
                "SWITCHBOARD_BROKER_ATTACH_MAX_BYTES", 4 * 1024 * 1024, minimum=0
            ),
            advertise_address=advertise,
            voice_hold_s=env.number("SWITCHBOARD_BROKER_VOICE_HOLD_S", 30.0, minimum=0.0),
            voice_replay_max_bytes=env.integer(
                "SWITCHBOARD_BROKER_VOICE_REPLAY_MAX_BYTES", 8 * 1024 * 1024, minimum=0
            ),
        )


# Listen hosts that name no address another process could dial.
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def reachable(listen: str) -> str:
    """`listen` (HOST:PORT) when others can dial it, else "" (a wildcard host, port 0)."""
    host, _, port = listen.rpartition(":")
    return "" if host in _WILDCARD_HOSTS or int(port) == 0 else listen


@dataclass(frozen=True, slots=True)
class ToolExecSettings:
    listen: str
    # HOST:PORT of the /metrics HTTP endpoint; "off" turns it off.
    metrics_listen: str
    log_level: str
    # YAML file of per-tenant tools and webhooks (docs/toolexec.md); None: every
    # tenant may use every built-in and there are no webhooks.
    tools_file: str | None = None
    # The tenants file (docs/tenants.md): its tenants' builtins and webhooks are
    # the tools when no separate tools file is set.
    tenants_file: str | None = None
    # Redis for idempotency across replicas; None keeps results in process memory.
    redis_url: Secret | None = None
    redis_cluster: bool = False
    # How long a finished call is kept for replays of its call_id.
    result_ttl_s: int = 24 * 3600
    # A tool result (compact JSON) larger than this is refused.
    max_output_bytes: int = 64 * 1024

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ToolExecSettings:
        env = Env(environ)
        redis_url = None
        if env.optional("SWITCHBOARD_REDIS_URL") is not None:
            redis_url = Secret(
                env.url("SWITCHBOARD_REDIS_URL", "", schemes=("redis", "rediss", "unix"))
            )
        return cls(
            listen=env.address("SWITCHBOARD_TOOLEXEC_LISTEN", DEFAULT_TOOLEXEC_ADDRESS),
            metrics_listen=env.address_or_off(
                "SWITCHBOARD_TOOLEXEC_METRICS_LISTEN", "127.0.0.1:9103"
            ),
            log_level=env.log_level(),
            tools_file=env.optional("SWITCHBOARD_TOOLEXEC_TOOLS_FILE"),
            tenants_file=env.optional("SWITCHBOARD_TENANTS_FILE"),
            redis_url=redis_url,
            redis_cluster=env.boolean("SWITCHBOARD_REDIS_CLUSTER", False),
            result_ttl_s=env.integer(
                "SWITCHBOARD_TOOLEXEC_RESULT_TTL_S", 24 * 3600, minimum=60, maximum=30 * 24 * 3600
            ),
            max_output_bytes=env.integer(
                "SWITCHBOARD_TOOLEXEC_MAX_OUTPUT_BYTES",
                64 * 1024,
                minimum=1024,
                maximum=1024 * 1024,
            ),
        )
