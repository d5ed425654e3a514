"""Every problem in a tenants document is one line naming its key path, without secrets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from switchboard.config import ConfigError
from switchboard.tenancy import TenantDirectory, hash_key
from tests.tenancy.documents import ACME_KEY, ENVIRON, SECRETS, UPSTREAM_SECRET, document

Edit = Callable[[dict[str, Any]], None]


def put(*path: str | int, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def drop(*path: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


ACME = ("tenants", "acme")
HASH = hash_key(ACME_KEY)

BAD_DOCUMENTS: list[tuple[str, Edit, str]] = [
    ("unknown top key", put("tenant", value={}), "tenant: unknown key"),
    ("tiers not a list", put("tiers", value="gold"), "tiers: must be a list"),
    ("no tiers", put("tiers", value=[]), "tiers: must list between 1 and 16 tiers"),
    ("tier not a label", put("tiers", value=["Gold Plus"]), "tiers[0]: must match"),
    ("tier twice", put("tiers", value=["free", "free"]), "tiers[1]: 'free' is listed twice"),
    ("no upstreams", drop("upstreams"), "upstreams: is required"),
    (
        "upstream kind",
        put("upstreams", "default", "kind", value="websocket"),
        "upstreams.default.kind: must be one of chat, realtime",
    ),
    (
        "a model mixing kinds",
        lambda data: (
            data["upstreams"]["local-vllm"].update(kind="realtime"),
            data["tenants"]["acme"]["models"].update(
                mixed={"deployments": [{"upstream": "default"}, {"upstream": "local-vllm"}]}
            ),
        ),
        "tenants.acme.models.mixed.deployments[1].upstream: mixes chat and realtime upstreams",
    ),
    (
        "rollover of a chat upstream",
        put("upstreams", "default", "rollover", value={"session_limit_s": 3600}),
        "upstreams.default.rollover: applies to upstreams of kind: realtime only",
    ),
    (
        "rollover without a limit",
        lambda data: data["upstreams"]["local-vllm"].update(
            kind="realtime", rollover={"margin_s": 60}
        ),
        "upstreams.local-vllm.rollover.session_limit_s: is required",
    ),
    (
        "rollover margin past the limit",
        lambda data: data["upstreams"]["local-vllm"].update(
            kind="realtime", rollover={"session_limit_s": 60, "margin_s": 60}
        ),
        "upstreams.local-vllm.rollover.margin_s: must be below session_limit_s",
    ),
    (
        "rollover unknown key",
        lambda data: data["upstreams"]["local-vllm"].update(
            kind="realtime", rollover={"session_limit_s": 60, "every_s": 5}
        ),
        "upstreams.local-vllm.rollover.every_s: unknown key",
    ),
    ("empty upstreams", put("upstreams", value={}), "upstreams: must define at least one"),
    (
        "upstream name",
        put("upstreams", "bad name", value={"base_url": "http://x"}),
        'upstreams["bad name"]: upstream names must be strings',
    ),
    (
        "upstream not a mapping",
        put("upstreams", "default", value=[]),
        "upstreams.default: must be a mapping",
    ),
    (
        "no base_url",
        drop("upstreams", "default", "base_url"),
        "upstreams.default.base_url: is required",
    ),
    (
        "base_url scheme",
        put("upstreams", "default", "base_url", value="ftp://api.example/v1"),
        "upstreams.default.base_url: must be an http(s) URL",
    ),
    (
        "base_url port",
        put("upstreams", "default", "base_url", value="http://api.example:nope/v1"),
        "upstreams.default.base_url: must be an http(s) URL",
    ),
    (
        "base_url credentials",
        put(
            "upstreams", "default", "base_url", value=f"https://u:{UPSTREAM_SECRET}@api.example/v1"
        ),
        "upstreams.default.base_url: must not hold credentials",
    ),
    (
        "base_url query",
        put(
            "upstreams",
            "default",
            "base_url",
            value=f"https://api.example/v1?key={UPSTREAM_SECRET}",
        ),
        "upstreams.default.base_url: must not hold credentials, a query",
    ),
    (
        "api_key_env not a name",
        put("upstreams", "default", "api_key_env", value="1-KEY"),
        "upstreams.default.api_key_env: must be an environment variable name",
    ),
    (
        "api_key_env unset",
        put("upstreams", "local-vllm", "api_key_env", value="UNSET_VARIABLE"),
        "upstreams.local-vllm.api_key_env: environment variable UNSET_VARIABLE is not set",
    ),
    (
        "inline api key",
        put("upstreams", "default", "api_key", value=UPSTREAM_SECRET),
        "upstreams.default.api_key: unknown key",
    ),
    ("no tenants", drop("tenants"), "tenants: is required"),
    ("empty tenants", put("tenants", value={}), "tenants: must define at least one tenant"),
    ("tenants not a mapping", put("tenants", value=["acme"]), "tenants: must be a mapping"),
    (
        "tenant id",
        put("tenants", "acme corp", value={}),
        'tenants["acme corp"]: tenant ids must be strings',
    ),
    (
        "tenant id a boolean",
        put("tenants", True, value={}),
        "tenants.True: tenant ids must be strings",
    ),
    ("tenant not a mapping", put(*ACME, value=None), "tenants.acme: must be a mapping"),
    ("unknown tenant key", put(*ACME, "limit", value={}), "tenants.acme.limit: unknown key"),
    ("no keys", drop(*ACME, "keys"), "tenants.acme.keys: is required"),
    (
        "empty keys",
        put(*ACME, "keys", value=[]),
        "tenants.acme.keys: must list at least one key hash",
    ),
    ("keys not a list", put(*ACME, "keys", value=HASH), "tenants.acme.keys: must be a list"),
    (
        "raw key for a hash",
        put(*ACME, "keys", value=[ACME_KEY]),
        "tenants.acme.keys[0]: must be the SHA-256",
    ),
    (
        "short hash",
        put(*ACME, "keys", value=[HASH[:40]]),
        "tenants.acme.keys[0]: must be the SHA-256",
    ),
    (
        "hash as a number",
        put(*ACME, "keys", value=[HASH, 12345]),
        "tenants.acme.keys[1]: must be the SHA-256",
    ),
    ("hash twice", put(*ACME, "keys", value=[HASH, HASH.upper()]), "tenants.acme.keys[1]: repeats"),
    (
        "unknown tier",
        put(*ACME, "tier", value="gold"),
        "tenants.acme.tier: must be one of the tiers",
    ),
    (
        "default tier not configured",
        put("tiers", value=["free", "pro"]),
        "tenants.acme.tier: is required: the default 'standard' is not one of the tiers",
    ),
    ("no models", drop(*ACME, "models"), "tenants.acme.models: is required"),
    (
        "empty models",
        put(*ACME, "models", value={}),
        "tenants.acme.models: must list at least one model",
    ),
    (
        "models a list",
        put(*ACME, "models", value=["fast"]),
        "tenants.acme.models: must be a mapping",
    ),
    (
        "model name with a space",
        put(*ACME, "models", "my model", value={}),
        'tenants.acme.models["my model"]: model names must be strings',
    ),
    (
        "unknown upstream",
        put(*ACME, "models", "fast", "upstream", value="nope"),
        "tenants.acme.models.fast.upstream: no upstream named 'nope' "
        "(defined: default, local-vllm)",
    ),
    (
        "dotted model name",
        put(*ACME, "models", "gpt-4.1", value={"upstream": "nope"}),
        'tenants.acme.models["gpt-4.1"].upstream: no upstream named',
    ),
    (
        "no default upstream",
        drop("upstreams", "default"),
        "tenants.acme.models.gpt-realtime.upstream: no upstream named 'default'",
    ),
    (
        "implicit default upstream missing",
        put("upstreams", value={"local-vllm": {"base_url": "http://vllm:8000/v1"}}),
        "tenants.acme.models.gpt-realtime.upstream: no upstream named 'default'",
    ),
    (
        "model route not a mapping",
        put(*ACME, "models", "fast", value="local-vllm"),
        "tenants.acme.models.fast: must be a mapping",
    ),
    (
        "unknown model key",
        put(*ACME, "models", "fast", "model", value="x"),
        "tenants.acme.models.fast.model: unknown key",
    ),
    (
        "upstream_model with a space",
        put(*ACME, "models", "fast", "upstream_model", value="llama 3"),
        "tenants.acme.models.fast.upstream_model: must be 1-256 characters",
    ),
    (
        "empty upstream_model",
        put(*ACME, "models", "fast", "upstream_model", value=""),
        "tenants.acme.models.fast.upstream_model: must be a non-empty string",
    ),
    (
        "builtins a string",
        put(*ACME, "builtins", value="calculate"),
        "tenants.acme.builtins: must be a list",
    ),
    (
        "empty builtin",
        put(*ACME, "builtins", value=[""]),
        "tenants.acme.builtins[0]: must be a non-empty string",
    ),
    (
        "builtin twice",
        put(*ACME, "builtins", value=["calculate", "calculate"]),
        "tenants.acme.builtins[1]: 'calculate' is listed twice",
    ),
    (
        "webhooks a mapping",
        put(*ACME, "webhooks", value={}),
        "tenants.acme.webhooks: must be a list",
    ),
    (
        "webhook a string",
        put(*ACME, "webhooks", value=["hook"]),
        "tenants.acme.webhooks[0]: must be a mapping",
    ),
    ("limits a list", put(*ACME, "limits", value=[600]), "tenants.acme.limits: must be a mapping"),
    (
        "unknown limit",
        put(*ACME, "limits", "rpm", value=600),
        "tenants.acme.limits.rpm: unknown key",
    ),
    *[
        (
            f"{name} = {value!r}",
            put(*ACME, "limits", name, value=value),
            f"tenants.acme.limits.{name}: must be a positive integer",
        )
        for name, value in [
            ("requests_per_minute", 0),
            ("requests_per_minute", "600"),
            ("tokens_per_minute", -1),
            ("concurrent_connections", 1.5),
            ("concurrent_responses", True),
            ("max_session_seconds", "1h"),
            ("max_output_tokens", 0),
        ]
    ],
    (
        "huge limit",
        put(*ACME, "limits", "tokens_per_minute", value=2**63),
        "tenants.acme.limits.tokens_per_minute: must be at most 2**62",
    ),
    (
        "zero budget",
        put(*ACME, "daily_token_budget", value=0),
        "tenants.acme.daily_token_budget: must be a positive integer",
    ),
    (
        "session a string",
        put(*ACME, "session", value="hi"),
        "tenants.acme.session: must be a mapping",
    ),
    (
        "unknown session key",
        put(*ACME, "session", "temperature", value=0.2),
        "tenants.acme.session.temperature: unknown key",
    ),
    (
        "session model not routed",
        put(*ACME, "session", "model", value="gpt-4o-mini"),
        "tenants.acme.session.model: must be one of this tenant's models",
    ),
    (
        "instructions not a string",
        put(*ACME, "session", "instructions", value=["be nice"]),
        "tenants.acme.session.instructions: must be a string",
    ),
    (
        "instructions too long",
        put(*ACME, "session", "instructions", value="x" * 70_000),
        "tenants.acme.session.instructions: must be at most 65536 characters",
    ),
    (
        "session output over the limit",
        put(*ACME, "session", "max_output_tokens", value=8192),
        "tenants.acme.session.max_output_tokens: must be at most limits.max_output_tokens (4096)",
    ),
    (
        "upstream and deployments",
        put(*ACME, "models", "fast", "deployments", value=[{"upstream": "default"}]),
        "tenants.acme.models.fast.upstream: name the upstream in each of `deployments` instead",
    ),
    (
        "deployments empty",
        put(*ACME, "models", "beta-model", value={"deployments": []}),
        "tenants.acme.models.beta-model.deployments: must list at least one deployment",
    ),
    (
        "deployment without upstream",
        put(*ACME, "models", "m", value={"deployments": [{"weight": 2}]}),
        "tenants.acme.models.m.deployments[0].upstream: is required",
    ),
    (
        "deployment of an unknown upstream",
        put(*ACME, "models", "m", value={"deployments": [{"upstream": "azure"}]}),
        "tenants.acme.models.m.deployments[0].upstream: no upstream named 'azure'",
    ),
    (
        "deployment listed twice",
        put(
            *ACME,
            "models",
            "m",
            value={"deployments": [{"upstream": "default"}, {"upstream": "default"}]},
        ),
        "tenants.acme.models.m.deployments[1].upstream: 'default' is listed twice",
    ),
    (
        "deployment weight",
        put(*ACME, "models", "m", value={"deployments": [{"upstream": "default", "weight": 0}]}),
        "tenants.acme.models.m.deployments[0].weight: must be a positive integer",
    ),
    (
        "deployment priority",
        put(*ACME, "models", "m", value={"deployments": [{"upstream": "default", "priority": -1}]}),
        "tenants.acme.models.m.deployments[0].priority: must be an integer >= 0",
    ),
    (
        "deployment unknown key",
        put(*ACME, "models", "m", value={"deployments": [{"upstream": "default", "order": 1}]}),
        "tenants.acme.models.m.deployments[0].order: unknown key",
    ),
    (
        "admission unknown key",
        put("upstreams", "default", "admission", value={"max_streams": 3}),
        "upstreams.default.admission.max_streams: unknown key",
    ),
    (
        "admission concurrency",
        put("upstreams", "default", "admission", value={"max_concurrent": 0}),
        "upstreams.default.admission.max_concurrent: must be a positive integer",
    ),
    (
        "admission queue",
        put("upstreams", "default", "admission", value={"max_queued": -1}),
        "upstreams.default.admission.max_queued: must be an integer >= 0",
    ),
    (
        "admission timeout",
        put("upstreams", "default", "admission", value={"queue_timeout_s": "5s"}),
        "upstreams.default.admission.queue_timeout_s: must be a number of seconds above 0",
    ),
    (
        "breaker failures",
        put("upstreams", "default", "circuit_breaker", value={"failures": 0}),
        "upstreams.default.circuit_breaker.failures: must be a positive integer",
    ),
    (
        "breaker cooldown",
        put("upstreams", "default", "circuit_breaker", value={"cooldown_s": 0}),
        "upstreams.default.circuit_breaker.cooldown_s: must be a number of seconds above 0",
    ),
    (
        "allow_private_hosts a string",
        put("allow_private_hosts", value="tools.internal"),
        "allow_private_hosts: must be a list",
    ),
    (
        "allow_private_hosts entry",
        put("allow_private_hosts", value=["ok", 7]),
        "allow_private_hosts[1]: must be a non-empty string",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"),
    [pytest.param(edit, message, id=name) for name, edit, message in BAD_DOCUMENTS],
)
def test_each_problem_is_one_line_naming_its_key_path(edit: Edit, message: str) -> None:
    data = document()
    edit(data)
    with pytest.raises(ConfigError) as caught:
        TenantDirectory.parse(data, ENVIRON)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text
    assert not [secret for secret in SECRETS if secret in text]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "the file is empty"),
        (["tenants"], "the file must hold a mapping"),
        ("tenants", "the file must hold a mapping"),
    ],
)
def test_the_document_must_be_a_mapping(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TenantDirectory.parse(data, ENVIRON)
