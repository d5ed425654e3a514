"""The log scan of the end-to-end suite finds key material when there is some."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import secret_leaks
from tools.stack import SIMULATOR_KEY, Stack


def test_scan_finds_each_kind_of_secret(tmp_path: Path) -> None:
    stack = Stack(log_dir=tmp_path, dev_key="sk-sb-" + "d" * 43)
    (tmp_path / "gateway.log").write_text(
        '{"msg": "connected"}\n'
        '{"msg": "auth", "key": "sk-sb-AAAAAAAAAAAAAAAAAAAAAAAA"}\n'
        '{"msg": "ok"}\n'
        '{"msg": "secret ek_BBBBBBBBBBBBBBBBBBBBBBBB"}\n'
    )
    (tmp_path / "broker.log").write_text(f"upstream key {SIMULATOR_KEY}\n")
    leaks = secret_leaks(stack)
    assert [leak.split(": ")[0] for leak in leaks] == [
        "broker.log:1",
        "gateway.log:2",
        "gateway.log:4",
    ]


def test_clean_logs_have_no_leaks(tmp_path: Path) -> None:
    (tmp_path / "session.log").write_text('{"msg": "listening", "tenant_id": "dev"}\n')
    assert secret_leaks(Stack(log_dir=tmp_path, dev_key="sk-sb-" + "e" * 43)) == []
