"""The tools file: checked at load with errors naming the key path, and reloaded on change."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from switchboard.config import ConfigError, Secret, ToolExecSettings
from switchboard.toolexec.builtins import builtin_registry
from switchboard.toolexec.catalog import Catalog, LiveCatalog, Refusal, Usable
from switchboard.toolexec.tools_config import load_tools_file
from switchboard.toolexec.webhooks import WebhookClient
from tests.toolexec.support import BUILTINS, clean_environ, run_toolexec

SECRET = "acme-secret-0123456789"
ENVIRON = {"ACME_SECRET": SECRET}

EXAMPLE = """\
allow_private_hosts: ["127.0.0.1"]
tenants:
  acme:
    builtins: [calculate, current_time]
    webhooks:
      - name: lookup_order
        description: Look up an order by id
        parameters:
          type: object
          properties: {order_id: {type: string}}
          required: [order_id]
          additionalProperties: false
        url: https://tools.acme.example/lookup_order
        secret_env: ACME_SECRET
        timeout_s: 5
        max_response_bytes: 65536
        max_concurrency: 8
  globex:
    builtins: [calculate]
"""


def write(tmp_path: Path, text: str, name: str = "tools.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load_tools_file(write(tmp_path, EXAMPLE), environ=ENVIRON, builtin_names=BUILTINS)
    assert config.allow_private_hosts == {"127.0.0.1"}
    assert config.tenants is not None
    assert set(config.tenants) == {"acme", "globex"}
    acme = config.tenants["acme"]
    assert acme.builtins == {"calculate", "current_time"}
    (spec,) = acme.webhooks
    assert (spec.tenant_id, spec.name, spec.url) == (
        "acme",
        "lookup_order",
        "https://tools.acme.example/lookup_order",
    )
    assert (spec.timeout_s, spec.max_response_bytes, spec.max_concurrency) == (5.0, 65536, 8)
    assert spec.secret == Secret(SECRET)
    assert spec.parameters["required"] == ["order_id"]
    assert SECRET not in repr(config)


def test_defaults_of_a_minimal_webhook(tmp_path: Path) -> None:
    text = """\
    tenants:
      acme:
        webhooks:
          - name: ping
            description: Ping
            url: "http://tools.internal/ping"
            secret_env: ACME_SECRET
    """
    config = load_tools_file(write(tmp_path, text), environ=ENVIRON, builtin_names=BUILTINS)
    assert config.tenants is not None
    (spec,) = config.tenants["acme"].webhooks
    assert (spec.timeout_s, spec.max_response_bytes, spec.max_concurrency) == (5.0, 65536, 16)
    assert spec.parameters == {"type": "object", "properties": {}}
    assert config.tenants["acme"].builtins == frozenset()
    assert config.allow_private_hosts == frozenset()


WEBHOOK = "{name: w, description: d, url: 'https://t.example/w', secret_env: ACME_SECRET}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'ftp://t.example/w', "
            "secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].url: must be an http(s) URL",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'not a url', "
            "secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].url: must be an http(s) URL",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, "
            "url: 'https://user:pw@t.example/w', secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].url: must not hold credentials (user:password@); the "
            "signature authenticates toolexec to the webhook",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: MISSING_SECRET}]}}",
            "tenants.acme.webhooks[0].secret_env: environment variable MISSING_SECRET is not set",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: SHORT_SECRET}]}}",
            "tenants.acme.webhooks[0].secret_env: environment variable SHORT_SECRET holds fewer "
            "than 16 characters; use a random secret such as `openssl rand -hex 32`",
        ),
        (
            "tenants: {acme: {webhooks: [{name: calculate, description: d, "
            "url: 'https://t.example/w', secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].name: 'calculate' is the name of a built-in tool",
        ),
        (
            "tenants: {acme: {webhooks: [{name: 'has space', description: d, "
            "url: 'https://t.example/w', secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].name: must be 1-64 letters, digits, underscores or dashes "
            "(OpenAI's rule)",
        ),
        (
            f"tenants: {{acme: {{webhooks: [{WEBHOOK}, {WEBHOOK}]}}}}",
            "tenants.acme.webhooks[1].name: 'w' is already the name of another webhook of this "
            "tenant",
        ),
        (
            "tenants: {acme: {builtins: [calculate, launch_rockets]}}",
            "tenants.acme.builtins[1]: unknown built-in tool 'launch_rockets' (known: calculate, "
            "current_time)",
        ),
        (
            "tenants: {acme: {webhook: []}}",
            "tenants.acme.webhook: unknown key (expected one of: builtins, webhooks)",
        ),
        (
            "tenant: {}",
            "tenant: unknown key (expected one of: allow_private_hosts, tenants)",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET}]}}",
            "tenants.acme.webhooks[0].description: is required",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, timeout_s: 61}]}}",
            "tenants.acme.webhooks[0].timeout_s: must be > 0 and at most 60",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, timeout_s: yes}]}}",
            "tenants.acme.webhooks[0].timeout_s: must be a number of seconds",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, max_concurrency: 0}]}}",
            "tenants.acme.webhooks[0].max_concurrency: must be between 1 and 1024",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, max_response_bytes: 2000000}]}}",
            "tenants.acme.webhooks[0].max_response_bytes: must be between 1 and 1048576",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, "
            "parameters: {type: object, properties: {id: {type: strin}}}}]}}",
            "tenants.acme.webhooks[0].parameters.properties.id.type: 'strin' is not valid under "
            "any of the given schemas",
        ),
        (
            "tenants: {acme: {webhooks: [{name: w, description: d, url: 'https://t.example/w', "
            "secret_env: ACME_SECRET, parameters: {type: array}}]}}",
            'tenants.acme.webhooks[0].parameters: the parameters schema must have "type": "object"',
        ),
        (
            "tenants: {no: {builtins: []}}",
            "tenants: tenant id 'False' must be a string matching [A-Za-z0-9_.-]{1,64} (quote ids "
            "YAML reads as other types)",
        ),
        ("allow_private_hosts: 127.0.0.1", "allow_private_hosts: must be a list"),
        (
            "allow_private_hosts: ['::1', 'tools.internal:8080']",
            "allow_private_hosts[1]: must be a host name or IP address, without scheme or port",
        ),
        (
            "allow_private_hosts: ['http://tools.internal']",
            "allow_private_hosts[0]: must be a host name or IP address, without scheme or port",
        ),
        ("- acme", "the file must hold a mapping"),
    ],
)
def test_errors_name_the_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    environ = {**ENVIRON, "SHORT_SECRET": "short"}
    with pytest.raises(ConfigError) as info:
        load_tools_file(path, environ=environ, builtin_names=BUILTINS)
    assert str(info.value) == f"{path}: {expected}"
    assert SECRET not in str(info.value)
    assert "short" not in str(info.value).replace("SHORT_SECRET", "")


def test_yaml_errors_and_duplicate_keys_name_the_line(tmp_path: Path) -> None:
    duplicate = write(tmp_path, "tenants:\n  acme: {}\n  acme: {}\n")
    with pytest.raises(ConfigError, match=r"line 3 column 3: duplicate key 'acme'"):
        load_tools_file(duplicate, environ=ENVIRON, builtin_names=BUILTINS)
    broken = write(tmp_path, "tenants: [\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line \d+ column \d+"):
        load_tools_file(broken, environ=ENVIRON, builtin_names=BUILTINS)
    with pytest.raises(ConfigError, match=r"cannot read the tools file"):
        load_tools_file(tmp_path / "absent.yaml", environ=ENVIRON, builtin_names=BUILTINS)


def test_an_empty_file_lets_nobody_use_anything(tmp_path: Path) -> None:
    config = load_tools_file(write(tmp_path, ""), environ=ENVIRON, builtin_names=BUILTINS)
    catalog = Catalog(builtin_registry(), config)
    assert catalog.tools_for("acme") == ()
    assert catalog.find("acme", "calculate") is Refusal.NOT_ALLOWED
    # Without any file, every tenant may use every built-in (the development default).
    open_catalog = Catalog(builtin_registry())
    assert [t.name for t in open_catalog.tools_for("anyone")] == ["calculate", "current_time"]


async def test_the_file_is_reloaded_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.toolexec")
    path = write(tmp_path, "tenants: {acme: {builtins: [calculate]}}")
    now = [100.0]
    client = WebhookClient()
    try:
        live = LiveCatalog(
            path,
            registry=builtin_registry(),
            client=client,
            environ=ENVIRON,
            clock=lambda: now[0],
        )
        assert [t.name for t in live.current().tools_for("acme")] == ["calculate"]

        write(tmp_path, EXAMPLE)
        assert [t.name for t in live.current().tools_for("acme")] == ["calculate"]  # < 1 s
        now[0] += 1.0
        names = [t.name for t in live.current().tools_for("acme")]
        assert names == ["calculate", "current_time", "lookup_order"]
        assert client.guard.is_exempt("127.0.0.1")
        before = live.current().find("acme", "lookup_order")
        assert isinstance(before, Usable)

        # A broken file is reported by key path and the previous tools stay.
        bad = EXAMPLE.replace("https://tools.acme.example/lookup_order", "gopher://x")
        write(tmp_path, bad)
        now[0] += 1.0
        assert [t.name for t in live.current().tools_for("acme")] == names
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.getMessage() == "tools file not reloaded; keeping the previous tools"
        assert "tenants.acme.webhooks[0].url: must be an http(s) URL" in vars(record)["error"]
        assert SECRET not in caplog.text

        # Fixed again (the webhook unchanged): loaded, and its semaphore is kept.
        write(tmp_path, EXAMPLE.replace("builtins: [calculate]\n", "builtins: []\n"))
        now[0] += 1.0
        after = live.current().find("acme", "lookup_order")
        assert isinstance(after, Usable)
        assert after.slots is before.slots
        assert live.current().find("globex", "calculate") is Refusal.NOT_ALLOWED
    finally:
        await client.close()


def test_a_bad_tools_file_stops_the_process_with_exit_2(tmp_path: Path) -> None:
    bad = EXAMPLE.replace("https://tools.acme.example/lookup_order", "gopher://x")
    path = write(tmp_path, bad)
    done = run_toolexec(
        clean_environ(SWITCHBOARD_TOOLEXEC_TOOLS_FILE=str(path), ACME_SECRET=SECRET)
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"toolexec: configuration error: {path}: tenants.acme.webhooks[0].url: "
        "must be an http(s) URL"
    ]


def test_settings() -> None:
    settings = ToolExecSettings.from_environ({})
    assert (settings.tools_file, settings.redis_url, settings.result_ttl_s) == (None, None, 86400)
    settings = ToolExecSettings.from_environ(
        {
            "SWITCHBOARD_TOOLEXEC_TOOLS_FILE": "/etc/switchboard/tools.yaml",
            "SWITCHBOARD_REDIS_URL": "redis://:pw@redis:6379/0",
            "SWITCHBOARD_TOOLEXEC_RESULT_TTL_S": "3600",
            "SWITCHBOARD_TOOLEXEC_MAX_OUTPUT_BYTES": "131072",
        }
    )
    assert settings.tools_file == "/etc/switchboard/tools.yaml"
    assert settings.redis_url == Secret("redis://:pw@redis:6379/0")
    assert "pw" not in repr(settings)
    assert (settings.result_ttl_s, settings.max_output_bytes) == (3600, 131072)
    with pytest.raises(ConfigError, match="SWITCHBOARD_REDIS_URL must be a redis/rediss/unix"):
        ToolExecSettings.from_environ({"SWITCHBOARD_REDIS_URL": "http://x"})
    with pytest.raises(ConfigError, match="SWITCHBOARD_TOOLEXEC_RESULT_TTL_S must be between"):
        ToolExecSettings.from_environ({"SWITCHBOARD_TOOLEXEC_RESULT_TTL_S": "1"})
