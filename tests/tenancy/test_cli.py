"""`python -m switchboard.tenancy`: new-key and check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from switchboard.tenancy import TenantDirectory, hash_key
from switchboard.tenancy.__main__ import main
from tests.tenancy.documents import ENVIRON, EXAMPLE, SECRETS, document, write


def test_new_key_prints_the_key_once_and_the_line_with_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["new-key", "acme"]) == 0
    out = capsys.readouterr().out
    [key] = re.findall(r"^key: (sk-sb-\S+)$", out, flags=re.MULTILINE)
    assert out.count(key) == 1
    [line] = [line for line in out.splitlines() if line.startswith("- ")]
    assert yaml.safe_load(line) == [hash_key(key)]
    assert f"SWITCHBOARD_TENANT_KEYS=acme={hash_key(key)}" in out

    # The printed line, pasted under tenants.acme.keys, lets the key in.
    data = document()
    data["tenants"]["acme"]["keys"] = yaml.safe_load(line)
    tenant = TenantDirectory.parse(data, ENVIRON).authenticate(key)
    assert tenant is not None and tenant.id == "acme"


def test_new_key_refuses_a_bad_tenant_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["new-key", "acme corp"])
    assert caught.value.code == 2
    assert "tenant id must match" in capsys.readouterr().err


def test_check_summarizes_a_valid_file_without_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    assert main(["check", str(EXAMPLE)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"ok: {EXAMPLE}\n")
    assert "default: https://api.openai.com/v1 (key from $OPENAI_API_KEY)" in captured.out
    assert "model fast -> local-vllm: meta-llama/Llama-3.1-8B-Instruct" in captured.out
    assert (
        "model chat -> local-vllm: meta-llama/Llama-3.1-8B-Instruct weight 3, default: gpt-4o-mini"
    ) in captured.out
    assert "admission: max_concurrent=64, max_queued=256" in captured.out
    assert "circuit_breaker: failures=3, cooldown_s=15" in captured.out
    assert "requests_per_minute=600" in captured.out
    assert "daily_token_budget=5000000" in captured.out
    directory = TenantDirectory.load(EXAMPLE, ENVIRON)
    hashes = [digest for tenant in directory for digest in tenant.key_hashes]
    assert not [value for value in (*SECRETS, *hashes) if value in captured.out]
    assert "Acme's assistant" not in captured.out
    assert captured.err == ""


def test_check_fails_with_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    bad = document()
    bad["tenants"]["acme"]["limits"]["requests_per_minute"] = 0
    path = write(tmp_path / "tenants.yaml", bad)
    assert main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"invalid: {path}: tenants.acme.limits.requests_per_minute: must be a positive integer\n"
    )


def test_check_without_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENVIRON:
        monkeypatch.delenv(name, raising=False)
    assert main(["check", str(EXAMPLE)]) == 1
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert main(["check", "--no-env", str(EXAMPLE)]) == 0
    assert "(key from $OPENAI_API_KEY, not set here)" in capsys.readouterr().out


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    env = {**os.environ, **ENVIRON}
    command = [sys.executable, "-m", "switchboard.tenancy", "check"]
    ok = subprocess.run([*command, str(EXAMPLE)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = tmp_path / "absent.yaml"
    failed = subprocess.run([*command, str(missing)], env=env, capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"invalid: {missing}: cannot read the tenants file")


def test_check_shows_a_realtime_upstreams_rollover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    data = document()
    data["upstreams"]["local-vllm"].update(
        kind="realtime", rollover={"session_limit_s": 3600, "margin_s": 120}
    )
    assert main(["check", str(write(tmp_path / "tenants.yaml", data))]) == 0
    assert "rollover: session_limit_s=3600, margin_s=120" in capsys.readouterr().out
