"""LiveTenants: reloading the tenants file as Kubernetes updates it, and load_tenants."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchboard.config import ConfigError
from switchboard.tenancy import LiveTenants, TenantDirectory, hash_key, load_tenants, new_key
from tests.tenancy.documents import ACME_KEY, ENVIRON, SECRETS, UPSTREAM_SECRET, document, write

LOGGER = "switchboard.tenancy"


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume.

    `tenants.yaml -> ..data/tenants.yaml`, `..data -> ..<timestamp>`; an update
    writes a new timestamped directory, swaps `..data` atomically with a
    rename, and deletes the old directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.path = root / "tenants.yaml"

    def publish(self, data: Any) -> None:
        self.generation += 1
        target = self.root / f"..2025_01_01_00_00_00.{self.generation:09d}"
        target.mkdir()
        (target / "tenants.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        previous = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        staging = self.root / "..data_tmp"
        staging.symlink_to(target.name)
        os.replace(staging, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/tenants.yaml")
        if previous is not None:
            shutil.rmtree(previous)


def with_tenant(tenant_id: str, key: str) -> dict[str, Any]:
    data = document()
    data["tenants"][tenant_id] = {"keys": [hash_key(key)], "models": {"gpt-4o-mini": {}}}
    return data


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_a_kubernetes_symlink_swap_is_picked_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    volume = SecretVolume(tmp_path)
    volume.publish(document())
    tenants = LiveTenants(volume.path, ENVIRON)
    first = tenants.current
    assert tenants.version == 1 and len(first) == 2
    assert tenants.reload() is False

    key = new_key()
    volume.publish(with_tenant("gamma", key))
    assert tenants.reload() is True
    assert tenants.version == 2
    assert tenants.current is not first
    gamma = tenants.current.authenticate(key)
    assert gamma is not None and gamma.id == "gamma"
    assert first.authenticate(key) is None  # snapshots never change
    [record] = [r for r in caplog.records if r.getMessage() == "tenants reloaded"]
    assert record.__dict__["tenants"] == 3 and record.__dict__["version"] == 2
    assert tenants.reload() is False


def test_republishing_the_same_content_is_not_a_reload(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish(document())
    tenants = LiveTenants(volume.path, ENVIRON)
    volume.publish(document())
    assert tenants.reload() is False
    assert tenants.version == 1


def test_an_in_place_edit_is_picked_up_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    path = write(tmp_path / "tenants.yaml", with_tenant("aaaa", "k1"))
    tenants = LiveTenants(path, ENVIRON)
    before = path.stat()
    write(path, with_tenant("bbbb", "k1"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert tenants.reload() is True
    assert tenants.current.get("bbbb") is not None and tenants.current.get("aaaa") is None


def test_an_invalid_new_file_keeps_the_previous_tenants(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    volume = SecretVolume(tmp_path)
    volume.publish(document())
    tenants = LiveTenants(volume.path, ENVIRON)
    current = tenants.current

    bad = document()
    bad["tenants"]["acme"]["limits"]["requests_per_minute"] = 0
    bad["upstreams"]["default"]["base_url"] = f"https://api.example/v1?key={UPSTREAM_SECRET}"
    volume.publish(bad)
    assert tenants.reload() is False
    volume.publish(bad)  # the same bad file again: not logged twice
    assert tenants.reload() is False
    assert tenants.current is current and tenants.version == 1
    assert tenants.current.authenticate(ACME_KEY) is not None

    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "tenants file rejected, previous tenants kept"
    error = record.__dict__["error"]
    assert error == f"{volume.path}: upstreams.default.base_url: must not hold credentials, " + (
        "a query or a fragment (put the key in api_key_env)"
    )
    assert not [secret for secret in SECRETS if secret in caplog.text + error]

    volume.publish(with_tenant("gamma", "k"))
    assert tenants.reload() is True
    assert tenants.version == 2 and tenants.current.get("gamma") is not None


def test_a_reload_needing_an_unset_variable_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "tenants.yaml", document())
    tenants = LiveTenants(path, ENVIRON)
    data = document()
    data["upstreams"]["extra"] = {"base_url": "http://extra/v1", "api_key_env": "EXTRA_KEY"}
    write(path, data)
    assert tenants.reload() is False
    assert "environment variable EXTRA_KEY is not set" in caplog.records[0].__dict__["error"]


def test_a_vanished_file_keeps_the_previous_tenants(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "tenants.yaml", document())
    tenants = LiveTenants(path, ENVIRON)
    path.unlink()
    assert tenants.reload() is False
    assert tenants.reload() is False
    assert tenants.current.authenticate(ACME_KEY) is not None
    assert messages(caplog) == ["tenants file rejected, previous tenants kept"]
    assert "cannot read the tenants file" in caplog.records[0].__dict__["error"]
    write(path, with_tenant("gamma", "k"))
    assert tenants.reload() is True


async def test_watch_reloads_until_cancelled(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish(document())
    tenants = LiveTenants(volume.path, ENVIRON)
    task = asyncio.create_task(tenants.watch(interval_s=0.01))
    try:
        volume.publish(with_tenant("gamma", "k"))
        async with asyncio.timeout(2):
            while tenants.version == 1:
                await asyncio.sleep(0.01)
        assert tenants.current.get("gamma") is not None
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_subscribers_hear_of_each_new_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "tenants.yaml", document())
    tenants = LiveTenants(path, ENVIRON)
    seen: list[TenantDirectory] = []

    def broken(directory: TenantDirectory) -> None:
        raise RuntimeError("subscriber bug")

    tenants.subscribe(broken)
    unsubscribe = tenants.subscribe(seen.append)
    write(path, with_tenant("gamma", "k"))
    assert tenants.reload() is True
    assert seen == [tenants.current]
    assert "tenants subscriber failed" in messages(caplog)
    unsubscribe()
    write(path, with_tenant("delta", "k"))
    assert tenants.reload() is True
    assert len(seen) == 1


def test_start_up_fails_on_a_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read the tenants file"):
        LiveTenants(tmp_path / "absent.yaml", ENVIRON)
    bad = document()
    bad["tenants"]["acme"]["limits"]["requests_per_minute"] = -1
    path = write(tmp_path / "tenants.yaml", bad)
    with pytest.raises(ConfigError) as caught:
        LiveTenants(path, ENVIRON)
    assert str(caught.value) == (
        f"{path}: tenants.acme.limits.requests_per_minute: must be a positive integer"
    )


def test_load_tenants_prefers_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "tenants.yaml", document())
    environ = {
        **ENVIRON,
        "SWITCHBOARD_TENANTS_FILE": str(path),
        "SWITCHBOARD_TENANT_KEYS": f"legacy={hash_key('legacy-key')}",
    }
    tenants = load_tenants(environ)
    assert tenants.path == path
    assert tenants.current.get("acme") is not None
    assert tenants.current.authenticate("legacy-key") is None
    assert "SWITCHBOARD_TENANT_KEYS ignored: SWITCHBOARD_TENANTS_FILE is set" in messages(caplog)


def test_load_tenants_falls_back_to_the_key_variable() -> None:
    key = new_key()
    tenants = load_tenants({"SWITCHBOARD_TENANT_KEYS": f"dev={hash_key(key)}"})
    tenant = tenants.current.authenticate(key)
    assert tenant is not None and tenant.route("any-model").name == "any-model"
    assert tenant.all_builtins
    assert tenants.path is None
    assert tenants.reload() is False


async def test_load_tenants_without_configuration_refuses_every_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenants = load_tenants({})
    assert len(tenants.current) == 0
    assert tenants.current.authenticate(ACME_KEY) is None
    assert any("no tenants configured" in message for message in messages(caplog))
    await asyncio.wait_for(tenants.watch(), 1)  # nothing to watch: returns at once


def test_load_tenants_reports_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the tenants file"):
        load_tenants({"SWITCHBOARD_TENANTS_FILE": str(tmp_path / "absent.yaml")})
