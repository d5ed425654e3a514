"""Tenants documents for the tests: a small valid one, and the environment it needs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from switchboard.tenancy import hash_key

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "tenants.yaml"

# Values the tests look for in every message, repr and log line: none may show.
UPSTREAM_SECRET = "sk-upstream-secret-value-0001"
LOCAL_SECRET = "local-secret-value-0002"
WEBHOOK_SECRET = "webhook-signing-secret-0003"
ACME_KEY = "sk-sb-acme-test-key"
BETA_KEY = "sk-sb-beta-test-key"
SECRETS = (UPSTREAM_SECRET, LOCAL_SECRET, WEBHOOK_SECRET, ACME_KEY, BETA_KEY)

ENVIRON = {
    "OPENAI_API_KEY": UPSTREAM_SECRET,
    "VLLM_API_KEY": LOCAL_SECRET,
    "ACME_LOOKUP_ORDER_SECRET": WEBHOOK_SECRET,
}

_BASE: dict[str, Any] = {
    "upstreams": {
        "default": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"},
        "local-vllm": {"base_url": "http://vllm:8000/v1", "api_key_env": "VLLM_API_KEY"},
    },
    "tenants": {
        "acme": {
            "keys": [hash_key(ACME_KEY)],
            "models": {
                "gpt-realtime": {"upstream": "default", "upstream_model": "gpt-4o-mini"},
                "fast": {"upstream": "local-vllm", "upstream_model": "llama-3-8b"},
            },
            "builtins": ["calculate"],
            "limits": {"max_output_tokens": 4096},
            "session": {"instructions": "You are Acme's assistant.", "max_output_tokens": 1024},
        },
        "beta": {"keys": [hash_key(BETA_KEY)], "models": {"gpt-4o-mini": {}}},
    },
}


def document() -> dict[str, Any]:
    """A fresh copy of a small valid document (two tenants, two upstreams)."""
    return copy.deepcopy(_BASE)


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
