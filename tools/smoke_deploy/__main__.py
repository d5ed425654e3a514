"""`make smoke-deploy`: build the image, render the chart's minimal values, run the pods
with `podman kube play`, talk to them from outside, SIGTERM the gateway mid-stream,
tear everything down.

    python -m tools.smoke_deploy [--standin-base] [--keep-going]

Every wait is bounded; on a failure the containers' logs are printed; the pods,
their files and the hosts file are removed whatever happens. What differs from a
cluster is printed (tools/smoke_deploy/kube_play.py, docs/deploy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from switchboard.tenancy import hash_key, new_key
from tools import image
from tools.chart import EXAMPLES, merge, named, render, values_file
from tools.redis_server import free_port
from tools.smoke_deploy import checks
from tools.smoke_deploy.kube_play import Playable, container_name, for_podman

READY_TIMEOUT_S = 120


def say(text: str) -> None:
    print(text, flush=True)


def podman(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and result.returncode != 0:
        raise checks.SmokeFailure(f"podman {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result.stdout


def smoke_values(key_hash: str) -> dict[str, Any]:
    """Over the minimal example: free ports (the pods share the host's network), a
    tenant whose key this run made, and a short drain so the SIGTERM check is quick."""
    return {
        "tenants": {"devKeys": f"smoke={key_hash}"},
        "gateway": {"port": free_port(), "drainTimeoutSeconds": 10},
        "session": {"port": free_port(), "metricsPort": free_port()},
        "broker": {"port": free_port(), "metricsPort": free_port()},
        "toolexec": {"port": free_port(), "metricsPort": free_port()},
        "simulator": {"port": free_port()},
        "redis": {"bundled": {"port": free_port()}},
    }


def write_files(playable: Playable) -> None:
    for path, content in playable.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        # Readable by the pods' users (10001, and 999 for Redis), like a Secret volume.
        path.chmod(0o644)
        for parent in path.parents:
            if parent == Path(tempfile.gettempdir()):
                break
            parent.chmod(0o755)


def wait_ready(playable: Playable, deadline_s: float) -> float:
    """Wait until every pod's readiness probe passes; a container that exits fails at once."""
    started = time.monotonic()
    pending = list(playable.probes)
    while pending:
        pending = [probe for probe in pending if not checks.probe_passes(probe)]
        for probe in pending:
            name = container_name(probe.deployment, probe.container)
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).strip()
            if state not in ("running", "created", "configured"):
                raise checks.SmokeFailure(f"{name} is {state or 'gone'} before it was ready")
        if pending and time.monotonic() - started > deadline_s:
            names = ", ".join(f"{p.deployment} ({p.kind} :{p.port})" for p in pending)
            raise checks.SmokeFailure(f"not ready after {deadline_s:.0f}s: {names}")
        if pending:
            time.sleep(0.5)
    return time.monotonic() - started


def print_logs(playable: Playable) -> None:
    for name in playable.grace:
        say(f"----- logs of {name} (last 60 lines) -----")
        result = subprocess.run(
            ["podman", "logs", "--tail", "60", name], capture_output=True, text=True, check=False
        )
        say((result.stdout + result.stderr).rstrip() or "(none)")


def container_facts(name: str) -> str:
    """Who the container runs as (not root), its root filesystem (read-only), its PID 1."""
    uid = podman("exec", name, "id", "-u").strip()
    writable = subprocess.run(
        ["podman", "exec", name, "touch", "/smoke-test"], capture_output=True, check=False
    )
    pid1 = podman("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ").strip()
    if uid == "0" or writable.returncode == 0:
        raise checks.SmokeFailure(f"{name} runs as uid {uid} on a writable root filesystem")
    return f"uid {uid}, root filesystem read-only, PID 1 `{pid1}`"


async def talk(playable: Playable, values: dict[str, Any], key: str) -> list[str]:
    gateway_port = values["gateway"]["port"]
    conversation = checks.Talk(gateway_port, key)
    lines = [await conversation.conversation(), await conversation.tool_call()]
    lines.append(
        checks.metrics(
            {
                "gateway": gateway_port,
                "session": values["session"]["metricsPort"],
                "broker": values["broker"]["metricsPort"],
                "toolexec": values["toolexec"]["metricsPort"],
            }
        )
    )
    gateway = next(n for n in playable.grace if "-gateway-" in n)
    grace = playable.grace[gateway]

    async def stop_gateway() -> float:
        started = time.monotonic()
        # As the kubelet does: SIGTERM, then SIGKILL when the grace period is over.
        await asyncio.to_thread(podman, "stop", "--time", str(grace), gateway, timeout_s=grace + 30)
        return time.monotonic() - started

    line, _ = await conversation.stream_through_sigterm(stop_gateway, grace)
    lines.append(line)
    code = podman("inspect", "--format", "{{.State.ExitCode}}", gateway).strip()
    if code != "0":
        raise checks.SmokeFailure(f"the gateway exited with {code}, not 0")
    lines.append(f"the gateway container exited with status {code}")
    return lines


def stop_the_rest(playable: Playable) -> str:
    """SIGTERM to every other container at once (as a `helm uninstall` would): each
    must exit 0 within its grace period."""
    names = [n for n in playable.grace if "-gateway-" not in n]

    def stop(name: str) -> tuple[str, str, float]:
        started = time.monotonic()
        grace = playable.grace[name]
        podman("stop", "--time", str(grace), name, timeout_s=grace + 30)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).strip()
        return name, code, time.monotonic() - started

    with ThreadPoolExecutor(len(names)) as pool:
        stopped = list(pool.map(stop, names))
    bad = [f"{name} exited {code}" for name, code, _ in stopped if code != "0"]
    if bad:
        raise checks.SmokeFailure("; ".join(bad))
    slowest = max(seconds for _, _, seconds in stopped)
    short = ", ".join(name.split("-pod-0-")[1] for name, _, _ in stopped)
    return f"SIGTERM to {short}: each exited 0 (the slowest in {slowest:.1f}s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--standin-base",
        action="store_true",
        help="build the python:3.11-slim and redis base images locally when missing",
    )
    args = parser.parse_args()
    if not shutil.which("podman"):
        raise SystemExit("make smoke-deploy needs podman (apt-get install podman)")
    started = time.monotonic()

    say("== image")
    minimal = values_file(EXAMPLES / "values-minimal.yaml")
    redis_image = "{repository}:{tag}".format(
        **render_defaults(minimal)["redis"]["bundled"]["image"]
    )
    if args.standin_base:
        image.standin_base()
        image.standin_redis(redis_image)
    name = image.build()
    say(f"{name}: {image.image_size_mb(name):.0f} MB")

    say("== render (values-minimal.yaml + free ports and a fresh tenant key)")
    key = new_key()
    values = merge(minimal, smoke_values(hash_key(key)))
    render_started = time.monotonic()
    objects = render(values)
    say(f"{len(objects)} objects rendered in {time.monotonic() - render_started:.2f}s")
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-smoke-"))
    playable = for_podman(objects, workdir)
    manifest = workdir / "play.yaml"
    manifest.write_text(yaml.safe_dump_all(playable.manifests, sort_keys=False))
    write_files(playable)
    say(f"played: {', '.join(d['metadata']['name'] for d in playable.manifests)}")
    say(f"left out (no cluster to act on them): {', '.join(playable.left_out)}")
    say(
        "differs from a cluster: host network + a hosts file for the Services; Secret values "
        "put in place by the harness; POD_IP=127.0.0.1 and $(VAR) expanded by the harness; "
        "readiness probes run by the harness; SIGTERM sent by `podman stop -t <grace>` "
        "(no preStop)"
    )
    failed = False
    passed = 0
    # A SIGTERM (a CI timeout) still tears down: SystemExit runs the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        say("== podman kube play")
        # --replace: pods a killed earlier run left behind are replaced, not a conflict.
        podman("kube", "play", "--replace", "--no-hosts", str(manifest), timeout_s=180)
        ready_s = wait_ready(playable, READY_TIMEOUT_S)
        say(f"all {len(playable.probes)} pods ready (their readiness probes) in {ready_s:.1f}s")
        passed += 1
        gateway = named(objects, "Deployment", "gateway")["metadata"]["name"]
        say("ok: gateway container: " + container_facts(container_name(gateway, "gateway")))
        passed += 1
        say("== from outside the containers")
        for line in asyncio.run(talk(playable, values, key)):
            say("ok: " + line)
            passed += 1
        say("ok: " + stop_the_rest(playable))
        passed += 1
    except Exception as exc:
        failed = True
        say(f"FAILED: {type(exc).__name__}: {exc}")
        print_logs(playable)
    finally:
        say("== teardown")
        podman("kube", "down", str(manifest), timeout_s=180, check=False)
        for pod in sorted({d["metadata"]["name"] + "-pod-0" for d in playable.manifests}):
            podman("pod", "rm", "--force", "--ignore", pod, timeout_s=60, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        left = podman("ps", "--all", "--format", "{{.Names}}", check=False).split()
        leftovers = sorted(set(left) & set(playable.grace))
        if leftovers:
            failed = True
            say(f"left behind: {', '.join(leftovers)}")
        else:
            say("pods and files removed")
            passed += 1
    say(f"smoke-deploy {'FAILED' if failed else 'passed'} in {time.monotonic() - started:.0f}s")
    # The plain closing line CI reads: checks passed, and 1 failed when anything did.
    say(f"smoke-deploy: {passed} passed, {int(failed)} failed")
    return 1 if failed else 0


def render_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The chart's default values merged with these (for the images it names)."""
    from tools.chart import CHART

    return merge(values_file(CHART / "values.yaml"), values)


if __name__ == "__main__":
    sys.exit(main())
