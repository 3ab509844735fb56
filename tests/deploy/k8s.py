"""The Kubernetes manifests: the kustomize base and overlays in deploy/k8s, rendered with
`kubectl kustomize` (offline) and read back as objects, and checks on them."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.artifacts import DEPLOY, load_yaml

K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
K8S_OVERLAYS = K8S / "overlays"

# Kubernetes release whose schemas (shipped by kubernetes-validate) the manifests must satisfy.
K8S_VERSION = "1.35.0"
# Interpreter exit and closing Redis connections after the lease release.
SHUTDOWN_MARGIN_S = 2.0


def kustomizations() -> list[Path]:
    """The kustomization.yaml of the base and of every overlay."""
    return sorted(K8S.glob("**/kustomization.yaml"))


def kustomization(folder: Path = K8S_BASE) -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(folder / "kustomization.yaml")
    return data


def overlays() -> list[str]:
    return sorted(p.name for p in K8S_OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())


@functools.cache
def _rendered(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("rendering the overlays needs kubectl (it runs offline: kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_OVERLAYS / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return result.stdout


def rendered(overlay: str = "fleet") -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/k8s/overlays/<overlay>` renders (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


def manifests(overlay: str = "fleet") -> Iterator[tuple[str, dict[str, Any]]]:
    """(overlay, object) for every object the overlay renders."""
    for document in rendered(overlay):
        yield overlay, document


def manifest(kind: str, overlay: str = "fleet", name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in rendered(overlay)
        if doc.get("kind") == kind and name in {None, doc["metadata"]["name"]}
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {overlay}, found {len(found)}"
    return found[0]


def schema_problems(document: dict[str, Any], version: str = K8S_VERSION) -> list[str]:
    """Errors of `document` against the strict Kubernetes schema of `version` (offline)."""
    try:
        kv.validate(document, version, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{where}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [str(exc.message)]
    return []


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    return containers[0]


def resolve_port(port: int | str, ports: list[dict[str, Any]]) -> int | None:
    """A probe's or Service's port: a number, or a container port's name."""
    if isinstance(port, int):
        return port
    for entry in ports:
        if entry.get("name") == port:
            number: int = entry["containerPort"]
            return number
    return None


def pre_stop_seconds(spec: Mapping[str, Any]) -> float:
    """How long the preStop hook waits: the `sleep` action, or `exec: [sleep, N]`."""
    hook = spec.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in {"sleep", "/bin/sleep", "/usr/bin/sleep"}:
        return float(command[1])
    return 0.0


def ingress_routes(ingress: dict[str, Any]) -> dict[str, tuple[str, str, str | int]]:
    """path -> (pathType, Service name, Service port) of every rule."""
    routes: dict[str, tuple[str, str, str | int]] = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            service = path["backend"]["service"]
            port = service["port"].get("name", service["port"].get("number"))
            routes[path["path"]] = (path["pathType"], service["name"], port)
    return routes
