"""A local Prometheus for the tests and tools/render_panels.py.

Runs Debian's `prometheus` binary (`apt-get install prometheus`, which also
brings `promtool`) on 127.0.0.1 with a generated configuration, its data in a
temporary folder, scraping the targets it is given every second and loading
rule files. `PrometheusClient` is the part that talks to the HTTP API, for a
Prometheus run by someone else. Missing binaries raise `PrometheusMissing` with
the install hint: tests that need them fail with that message instead of being
skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.redis_server import free_port

INSTALL_HINT = "install Debian's prometheus package: apt-get install -y prometheus"


class PrometheusMissing(RuntimeError):
    """The prometheus or promtool binary is not installed."""


class QueryError(RuntimeError):
    """Prometheus answered a query with an error."""


def find_binary(name: str) -> str:
    """Path of `prometheus` or `promtool`: $SWITCHBOARD_<NAME>, else PATH."""
    explicit = os.environ.get(f"SWITCHBOARD_{name.upper()}")
    found = shutil.which(explicit or name)
    if not found:
        raise PrometheusMissing(f"no `{explicit or name}` binary found; {INSTALL_HINT}")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with `args`; the result carries its output whatever the exit code."""
    return subprocess.run(
        [find_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


class PrometheusClient:
    """Prometheus' HTTP API at `url` (a running Prometheus, ours or not)."""

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")

    @property
    def url(self) -> str:
        return self._url

    def api(self, path: str, **params: str | float) -> Any:
        """GET /api/v1/<path>; the `data` of a success, QueryError otherwise."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples, or [scalar] as one sample)."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result


@dataclass
class PrometheusServer(PrometheusClient):
    """One Prometheus process scraping `targets` (job name -> HOST:PORT list)."""

    targets: dict[str, list[str]]
    rule_files: list[Path] = field(default_factory=list)
    scrape_interval: str = "1s"
    port: int = 0
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prometheus-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]}
                for job, addresses in self.targets.items()
            ],
        }

    def start(self, timeout_s: float = 30.0) -> None:
        binary = find_binary("prometheus")
        self.port = self.port or free_port()
        config = self.data_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        log = (self.data_dir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.data_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self.data_dir / 'prometheus.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout_s:.0f}s")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop and delete the data folder."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
