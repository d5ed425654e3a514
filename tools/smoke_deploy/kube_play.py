"""The rendered chart, made playable by `podman kube play` on one host (pure, no I/O).

What a cluster does that podman 4.3 does not, and what is done instead (printed by
`make smoke-deploy`, explained in docs/deploy.md):

- Services are not played: every pod uses the host's network and a hosts file maps
  each Service's DNS names to 127.0.0.1, so the services find each other by the
  names the chart gives them (the chart's ports are made free ones by the values).
- Secrets: podman 4.3 stores a played Secret in a form its own `secretKeyRef`
  cannot read, and crashes on secret volumes; their values are put in place here
  (env values, and files in a host directory for secret volumes).
- The downward API's `status.podIP` is unsupported, and `$(VAR)` references in env
  values are not expanded: here POD_IP is 127.0.0.1 (the host network's address)
  and references are expanded as the kubelet does.
- Probes become podman healthchecks that run `curl`/`nc` (not in the image) or are
  ignored: they are removed here and the harness runs each readiness probe itself.
- Container ports are removed: podman refuses port mappings on the host network.
- NetworkPolicies, PDBs, HPAs, the ServiceAccount and the monitoring objects have
  nothing to act on without a cluster: they are left out (the chart tests check them).
"""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Object = dict[str, Any]
POD_IP = "127.0.0.1"
# Kinds podman plays; the others are left out (see above).
PLAYED = {"Deployment"}
# $(NAME) is a reference, $$(NAME) an escaped literal $(NAME) (Kubernetes' rule).
REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class Probe:
    """A readiness probe the harness runs from outside, on the host network."""

    deployment: str
    container: str
    kind: str  # httpGet, grpc or tcpSocket
    port: int
    path: str = ""


@dataclass
class Playable:
    manifests: list[Object]
    # Files of the secret volumes and the hosts file: path -> content.
    files: dict[Path, bytes]
    probes: list[Probe]
    # The gateway's grace period by container name (`podman stop -t`), for every pod.
    grace: dict[str, int] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)


def secret_data(secret: Object) -> dict[str, str]:
    """A Secret's keys and values, from `data` (base64) and `stringData`."""
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def expand(value: str, known: dict[str, str]) -> str:
    """Expand $(NAME) from variables defined earlier, as the kubelet does; unknown
    references stay as they are, and $$ is a literal $."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return known.get(name, match.group(0))

    return REFERENCE.sub(one, value)


def resolve_env(box: Object, secrets: dict[str, dict[str, str]]) -> list[Object]:
    """The container's env with every secret and pod field in place, references expanded."""
    resolved: list[Object] = []
    known: dict[str, str] = {}
    for source in box.get("envFrom", []):
        ref = source.get("secretRef") or {}
        for name, value in sorted(secrets.get(ref.get("name", ""), {}).items()):
            known[name] = value
            resolved.append({"name": name, "value": value})
    for item in box.get("env", []):
        if "valueFrom" in item:
            origin = item["valueFrom"]
            if "secretKeyRef" in origin:
                ref = origin["secretKeyRef"]
                value = secrets[ref["name"]][ref["key"]]
            elif origin.get("fieldRef", {}).get("fieldPath") == "status.podIP":
                value = POD_IP
            else:
                raise ValueError(f"cannot play env {item['name']}: {origin}")
        else:
            value = expand(str(item.get("value", "")), known)
        known[item["name"]] = value
        resolved.append({"name": item["name"], "value": value})
    return resolved


def hosts_file(services: list[Object]) -> bytes:
    lines = ["127.0.0.1 localhost"]
    for service in services:
        name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
        aliases = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc"]
        lines.append(" ".join(["127.0.0.1", *aliases, f"{name}.{namespace}.svc.cluster.local"]))
    return ("\n".join(lines) + "\n").encode()


def _probe(deployment: str, box: Object, ports: dict[str, int]) -> Probe:
    probe = box["readinessProbe"]
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        number = ports[port] if isinstance(port, str) else int(port)
        return Probe(deployment, box["name"], "httpGet", number, probe["httpGet"]["path"])
    if "grpc" in probe:
        return Probe(deployment, box["name"], "grpc", int(probe["grpc"]["port"]))
    port = probe["tcpSocket"]["port"]
    return Probe(
        deployment, box["name"], "tcpSocket", ports[port] if isinstance(port, str) else int(port)
    )


def for_podman(objects: list[Object], workdir: Path) -> Playable:
    """What `podman kube play` runs for these rendered objects, and the files it needs
    under `workdir` (written by the caller)."""
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objects if o["kind"] == "Secret"}
    services = [o for o in objects if o["kind"] == "Service"]
    hosts = workdir / "hosts"
    playable = Playable([], {hosts: hosts_file(services)}, [])
    playable.left_out = sorted(
        {o["kind"] for o in objects if o["kind"] not in PLAYED | {"Secret", "Service"}}
    )
    for original in objects:
        if original["kind"] not in PLAYED:
            continue
        deployment = copy.deepcopy(original)
        name = deployment["metadata"]["name"]
        deployment["spec"]["replicas"] = 1
        pod = deployment["spec"]["template"]["spec"]
        pod["hostNetwork"] = True
        volumes = []
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                directory = workdir / "secrets" / name / volume["name"]
                data = secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    playable.files[directory / item["path"]] = data[item["key"]].encode()
                volume = {
                    "name": volume["name"],
                    "hostPath": {"path": str(directory), "type": "Directory"},
                }
            volumes.append(volume)
        volumes.append({"name": "hosts", "hostPath": {"path": str(hosts), "type": "File"}})
        pod["volumes"] = volumes
        for box in pod["containers"]:
            ports = {p["name"]: int(p["containerPort"]) for p in box.pop("ports", [])}
            box["env"] = resolve_env(box, secrets)
            box.pop("envFrom", None)
            if "readinessProbe" in box:
                playable.probes.append(_probe(name, box, ports))
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                box.pop(probe, None)
            mounts = box.setdefault("volumeMounts", [])
            mounts.append({"name": "hosts", "mountPath": "/etc/hosts", "readOnly": True})
            playable.grace[container_name(name, box["name"])] = int(
                pod.get("terminationGracePeriodSeconds", 30)
            )
        playable.manifests.append(deployment)
    return playable


def container_name(deployment: str, container: str) -> str:
    """The name podman gives a Deployment's container: its pod is DEPLOYMENT-pod-0."""
    return f"{deployment}-pod-0-{container}"
