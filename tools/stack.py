"""Start the whole Switchboard system on this machine: `make run` and the e2e tests.

Starts Redis (unless SWITCHBOARD_REDIS_URL points at one), the upstream
simulator (unless OPENAI_API_KEY, OPENAI_BASE_URL or
SWITCHBOARD_BROKER_UPSTREAM_URL say where the real upstream is), then the
session, toolexec, broker and gateway services as separate processes talking
gRPC; waits until every one is healthy; prints the WebSocket URL and the
development tenant key. A process that crashes is restarted with backoff (as
Kubernetes would), and the restart is printed; the rest keeps serving. Redis
keeps its data in .run/redis (append-only file, fsync every second), so
sessions outlive a Redis crash and a restart of `make run`. Ctrl-C (or
SIGTERM) stops everything, gateway first.

    python -m tools.stack            # ports 8080 (gateway), 50051-50053, 6379, 8090
    python -m tools.stack --free-ports

The `Stack` class is the same launcher as a Python API: the end-to-end tests
start it on free ports and kill or restart single processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from tools.redis_server import RedisCluster3, RedisServer, free_port
from tools.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
DEV_TENANT = "dev"
SIMULATOR_KEY = "sk-simulator-not-a-secret"


@dataclass
class Ports:
    gateway: int = 8080
    session: int = 50051
    broker: int = 50052
    toolexec: int = 50053
    redis: int = 6379
    simulator: int = 8090
    broker_metrics: int = 9102
    toolexec_metrics: int = 9103
    session_metrics: int = 9101
    demo: int = 8081

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in fields(cls)))

    @classmethod
    def from_environ(cls) -> Ports:
        ports = cls()
        ports.gateway = int(os.environ.get("SWITCHBOARD_GATEWAY_PORT", ports.gateway))
        return ports


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    # True when the service answers its health check.
    healthy: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None
    # True while `stop` runs: an exit then is not a crash.
    stopping: bool = False

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def crashed(self) -> bool:
        """It was started and exited without being stopped."""
        return self.process is not None and not self.stopping and self.process.poll() is not None

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        self.stopping = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.stopping = False


@dataclass
class Stack:
    """The four services plus Redis and (by default) the simulator, as processes."""

    ports: Ports = field(default_factory=Ports)
    dev_key: str = ""
    simulate: bool = True
    redis_url: str | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="switchboard-")))
    extra_env: dict[str, str] = field(default_factory=dict)
    simulator_args: list[str] = field(default_factory=list)
    # More simulators (same arguments), one per port, for tenants files with
    # several upstream deployments: `simulator-2`, `simulator-3`, ...
    extra_simulator_ports: list[int] = field(default_factory=list)
    redis_args: tuple[str, ...] = ()
    # Start a 3-node Redis Cluster instead of one Redis server.
    redis_cluster: bool = False
    cluster: RedisCluster3 | None = None
    # Gateway and broker processes (replica i > 1 of each gets free ports; gateway i
    # talks to broker i), to show that limits hold across replicas.
    replicas: int = 1
    redis: RedisServer | None = None
    services: dict[str, Service] = field(default_factory=dict)
    # Keep Redis's data in this folder (append-only file, fsync every second):
    # `make run` keeps it in .run/redis. None: a temporary folder, kept nowhere.
    redis_dir: Path | None = None
    supervisor: Supervisor | None = None
    # Serve the demo page (tools/demo) too, on `ports.demo`.
    demo: bool = False
    _extra_gateway_ports: list[int] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def websocket_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports.gateway}/v1/realtime"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.simulator}"

    def _env(self) -> dict[str, str]:
        from switchboard.tenancy import hash_key

        env = {**os.environ, **self.extra_env}
        env.update(
            PYTHONUNBUFFERED="1",
            SWITCHBOARD_REDIS_URL=self.redis_url or f"redis://127.0.0.1:{self.ports.redis}/0",
            SWITCHBOARD_TENANT_KEYS=f"{DEV_TENANT}={hash_key(self.dev_key)}",
            SWITCHBOARD_GATEWAY_HOST="127.0.0.1",
            SWITCHBOARD_GATEWAY_PORT=str(self.ports.gateway),
            SWITCHBOARD_SESSION_LISTEN=f"127.0.0.1:{self.ports.session}",
            SWITCHBOARD_SESSION_METRICS_LISTEN=f"127.0.0.1:{self.ports.session_metrics}",
            SWITCHBOARD_BROKER_LISTEN=f"127.0.0.1:{self.ports.broker}",
            SWITCHBOARD_BROKER_METRICS_LISTEN=f"127.0.0.1:{self.ports.broker_metrics}",
            SWITCHBOARD_TOOLEXEC_METRICS_LISTEN=f"127.0.0.1:{self.ports.toolexec_metrics}",
            SWITCHBOARD_TOOLEXEC_LISTEN=f"127.0.0.1:{self.ports.toolexec}",
            SWITCHBOARD_GATEWAY_SESSION_TARGET=f"127.0.0.1:{self.ports.session}",
            SWITCHBOARD_GATEWAY_BROKER_TARGET=f"127.0.0.1:{self.ports.broker}",
            SWITCHBOARD_GATEWAY_TOOLEXEC_TARGET=f"127.0.0.1:{self.ports.toolexec}",
        )
        if self.simulate:
            env["SWITCHBOARD_BROKER_UPSTREAM_URL"] = f"{self.simulator_url}/v1"
            env["SWITCHBOARD_BROKER_UPSTREAM_API_KEY"] = SIMULATOR_KEY
            # The simulator speaks the Realtime protocol too: development tenants
            # get the voice model `gpt-realtime-voice` on it (docs/voice.md).
            env.setdefault("SWITCHBOARD_BROKER_REALTIME_URL", f"{self.simulator_url}/v1")
        return env

    @property
    def gateway_ports(self) -> list[int]:
        """The port of every gateway replica, the first one first."""
        return [self.ports.gateway, *self._extra_gateway_ports]

    def _define(self) -> None:
        env = self._env()
        python = sys.executable
        if self.simulate:
            launch = [python, "-m", "tools.simulator", "--host", "127.0.0.1"]
            sim_argv = [*launch, "--port", str(self.ports.simulator), *self.simulator_args]
            self._add("simulator", sim_argv, env, lambda: _http_ok(f"{self.simulator_url}/healthz"))
            for number, port in enumerate(self.extra_simulator_ports, start=2):
                argv = [*launch, "--port", str(port), *self.simulator_args]
                url = f"http://127.0.0.1:{port}/healthz"
                self._add(f"simulator-{number}", argv, env, _http_probe(url))
        for name in ("session", "toolexec", "broker"):
            target = f"127.0.0.1:{getattr(self.ports, name)}"
            self._add(name, [python, "-m", f"switchboard.{name}"], env, _grpc_probe(target))
        self._add(
            "gateway",
            [python, "-m", "switchboard.gateway"],
            env,
            lambda: _http_ok(f"{self.gateway_url}/readyz"),
        )
        self._extra_gateway_ports = []
        for replica in range(2, self.replicas + 1):
            broker_port, gateway_port = free_port(), free_port()
            self._extra_gateway_ports.append(gateway_port)
            broker_env = {
                **env,
                "SWITCHBOARD_BROKER_LISTEN": f"127.0.0.1:{broker_port}",
                "SWITCHBOARD_BROKER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            }
            self._add(
                f"broker-{replica}",
                [python, "-m", "switchboard.broker"],
                broker_env,
                _grpc_probe(f"127.0.0.1:{broker_port}"),
            )
            gateway_env = {
                **env,
                "SWITCHBOARD_GATEWAY_PORT": str(gateway_port),
                "SWITCHBOARD_GATEWAY_BROKER_TARGET": f"127.0.0.1:{broker_port}",
            }
            self._add(
                f"gateway-{replica}",
                [python, "-m", "switchboard.gateway"],
                gateway_env,
                _http_probe(f"http://127.0.0.1:{gateway_port}/readyz"),
            )
        if self.demo:
            self._define_demo(env)

    @property
    def demo_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.demo}/"

    def _define_demo(self, env: dict[str, str]) -> None:
        """The demo page's server: it mints `ek_` secrets with the development key,
        which only it is given (never the browser)."""
        argv = [sys.executable, "-m", "tools.demo", "--port", str(self.ports.demo)]
        for port in self.gateway_ports:
            argv += ["--gateway", f"http://127.0.0.1:{port}"]
        demo_env = {**env, "SWITCHBOARD_DEMO_TENANT_KEY": self.dev_key}
        self._add("demo", argv, demo_env, _http_probe(f"{self.demo_url}healthz"))

    def _add(
        self, name: str, argv: list[str], env: dict[str, str], healthy: Callable[[], bool]
    ) -> None:
        self.services[name] = Service(name, argv, env, self.log_dir / f"{name}.log", healthy)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start everything and wait until all of it is healthy."""
        if not self.dev_key:
            from switchboard.tenancy import new_key

            self.dev_key = new_key()
        if self.redis_cluster:
            self.cluster = RedisCluster3()
            self.cluster.start()
            self.redis_url = f"redis://127.0.0.1:{self.cluster.ports[0]}"
            self.extra_env["SWITCHBOARD_REDIS_CLUSTER"] = "true"
        elif self.redis_url is None:
            self.redis = RedisServer(
                self.ports.redis, extra_args=self.redis_args, data_dir=self.redis_dir
            )
            self.redis.start()
        self._define()
        for service in self.services.values():
            service.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = 30.0, names: tuple[str, ...] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(names or self.services)
        while pending:
            for name in sorted(pending):
                service = self.services[name]
                if not service.alive():
                    raise RuntimeError(f"{name} exited; see {service.log_path}")
                if service.healthy():
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not healthy after {timeout_s:.0f}s: {', '.join(sorted(pending))}"
                )
            if pending:
                time.sleep(0.1)

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        service = self.services[name]
        service.stop()
        service.start()
        self.wait_ready(timeout_s, names=(name,))

    def supervise(self, report: Callable[[str], None] = print) -> Supervisor:
        """Restart what crashes from now on, in a background thread (see `Supervisor`)."""
        self.supervisor = Supervisor(self, report)
        self.supervisor.start()
        return self.supervisor

    def stop(self) -> None:
        """Stop the gateway first so clients are closed before their backends go."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        order = ("demo", "gateway", "broker", "toolexec", "session", "simulator")
        for service in sorted(
            self.services.values(), key=lambda s: order.index(s.name.split("-")[0])
        ):
            service.stop()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_probe(url: str) -> Callable[[], bool]:
    return lambda: _http_ok(url)


def _grpc_probe(target: str) -> Callable[[], bool]:
    return lambda: _grpc_serving(target)


def _grpc_serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".run" / "logs")
    args = parser.parse_args()

    real_upstream = any(
        os.environ.get(var)
        for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SWITCHBOARD_BROKER_UPSTREAM_URL")
    )
    args.log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        ports=Ports.free() if args.free_ports else Ports.from_environ(),
        dev_key=os.environ.get("SWITCHBOARD_DEV_KEY", ""),
        simulate=not real_upstream,
        redis_url=os.environ.get("SWITCHBOARD_REDIS_URL"),
        log_dir=args.log_dir,
        redis_dir=args.log_dir.parent / "redis",
        demo=True,
    )
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(
        "starting Redis, "
        + ("the upstream SIMULATOR, " if stack.simulate else "")
        + "and the four services..."
    )
    stack.start()
    upstream = (
        "the local upstream SIMULATOR (no OPENAI_API_KEY set)"
        if stack.simulate
        else (
            os.environ.get("SWITCHBOARD_BROKER_UPSTREAM_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or "https://api.openai.com/v1"
        )
    )
    voice_note = "   (the simulator's Realtime endpoint)" if stack.simulate else ""
    if not stack.simulate and not os.environ.get("SWITCHBOARD_BROKER_REALTIME_URL"):
        voice_note = "   (set SWITCHBOARD_BROKER_REALTIME_URL for a Realtime upstream)"
    print(
        f"""
Switchboard is running.
  WebSocket:  {stack.websocket_url}?model=gpt-realtime
  Voice:      {stack.websocket_url}?model=gpt-realtime-voice{voice_note}
  API key:    {stack.dev_key}   (tenant "{DEV_TENANT}"; fix it with SWITCHBOARD_DEV_KEY)
  Upstream:   {upstream}
  Health:     {stack.gateway_url}/readyz
  Demo page:  {stack.demo_url}   (the TypeScript SDK in your browser)
  Logs:       {stack.log_dir}/

Try it:  .venv/bin/python -m tools.chat --url {stack.websocket_url} --key {stack.dev_key}
Press Ctrl-C to stop.""",
        flush=True,
    )

    def report(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    # A service that crashes is restarted (with backoff), as Kubernetes would;
    # the rest keeps serving meanwhile.
    stack.supervise(report)
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        print("\nstopping...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
