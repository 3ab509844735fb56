"""The sidecar overlay: presence-svc as a native sidecar of an app, routed by one Ingress."""

from __future__ import annotations

from typing import Any

import pytest

from presence_svc.app import RELEASE_TIMEOUT
from presence_svc.settings import Settings
from presence_svc.web.rest import ROUTES
from tests.deploy.artifacts import (
    PLACEHOLDER_SECRETS,
    served_port,
    settings_from_env,
    unknown_settings,
)
from tests.deploy.k8s import (
    SHUTDOWN_MARGIN_S,
    cpu_cores,
    ingress_routes,
    manifest,
    pre_stop_seconds,
    resolve_port,
)

OVERLAY = "sidecar"
ROUTE_PATHS = {route.path for route in ROUTES}


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = manifest("Deployment", OVERLAY)["spec"]["template"]["spec"]
    return spec


def sidecar() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod()["initContainers"]
    (container,) = containers
    assert container["name"] == "presence-svc"
    return container


def app() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod()["containers"]
    (container,) = containers
    return container


def env_value(container: dict[str, Any], name: str) -> str:
    (entry,) = [e for e in container["env"] if e["name"] == name]
    value: str = entry["value"]
    return value


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What the sidecar reads: the base's ConfigMap plus the Secret's two values."""
    data: dict[str, str] = manifest("ConfigMap", OVERLAY)["data"]
    return settings_from_env(monkeypatch, {**data, **PLACEHOLDER_SECRETS})


def test_presence_is_a_native_sidecar_started_before_the_app() -> None:
    # An init container that is restarted (not run to completion) is a native sidecar: it
    # starts before the app containers and is stopped after them.
    assert sidecar()["restartPolicy"] == "Always"
    assert "restartPolicy" not in app()
    assert sidecar()["image"].startswith("presence-svc:")
    # No command/args: the image's exec-form ENTRYPOINT stays PID 1 and receives SIGTERM.
    assert "command" not in sidecar() and "args" not in sidecar()
    (port,) = sidecar()["ports"]
    assert port["containerPort"] == served_port()
    # The app starts only once this passes (the kubelet waits for a sidecar's startup).
    assert "startupProbe" in sidecar()


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")],
)
def test_sidecar_probes_hit_app_routes_on_the_served_port(probe: str, path: str) -> None:
    get = sidecar()[probe]["httpGet"]
    assert get["path"] == path and path in ROUTE_PATHS
    assert resolve_port(get["port"], sidecar()["ports"]) == served_port()


def test_app_probes_its_own_port() -> None:
    for probe in ("readinessProbe", "livenessProbe"):
        port = resolve_port(app()[probe]["httpGet"]["port"], app()["ports"])
        assert port == int(env_value(app(), "APP_PORT")), probe


def test_grace_period_covers_the_app_stop_then_the_drain_and_release(settings: Settings) -> None:
    app_stop = pre_stop_seconds(app()) + float(env_value(app(), "APP_DRAIN_TIMEOUT"))
    assert pre_stop_seconds(app()) >= 3, "endpoints need a few seconds to drop the pod"
    # The sidecar is stopped only once the app has exited: its preStop, drain (1012) and lease
    # release come after the app's whole stop, within the same pod budget.
    node_stop = pre_stop_seconds(sidecar()) + settings.drain_timeout + RELEASE_TIMEOUT
    needed = app_stop + node_stop + SHUTDOWN_MARGIN_S
    assert pod()["terminationGracePeriodSeconds"] >= needed
    # Named explicitly, so a ConfigMap without it fails the pod instead of falling back to a
    # default the budget was not sized for.
    (drain,) = [e for e in sidecar()["env"] if e["name"] == "PRESENCE_DRAIN_TIMEOUT"]
    assert drain["valueFrom"]["configMapKeyRef"]["name"] == "presence-svc"


def test_every_presence_name_in_either_container_is_a_setting() -> None:
    names = [e["name"] for c in (sidecar(), app()) for e in c["env"]]
    presence = [n for n in names if n.startswith("PRESENCE_")]
    assert "PRESENCE_JWT_SECRET" in presence and "PRESENCE_KEY_PREFIX" in presence
    assert unknown_settings(presence) == []
    assert [e["configMapRef"]["name"] for e in sidecar()["envFrom"]] == ["presence-svc"]


def test_both_containers_share_the_secret_and_the_key_prefix() -> None:
    def refs(container: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("valueFrom") for e in container["env"]}

    for name in ("PRESENCE_JWT_SECRET", "PRESENCE_REDIS_URL"):
        assert refs(app())[name] == refs(sidecar())[name], name
        assert refs(app())[name]["secretKeyRef"]["name"] == "presence-svc-secrets"
    assert refs(app())["PRESENCE_KEY_PREFIX"]["configMapKeyRef"]["name"] == "presence-svc"
    # The app reaches its sidecar on loopback, on the port it serves.
    assert env_value(app(), "APP_PRESENCE_URL") == f"http://127.0.0.1:{served_port()}"


def test_resources_requested_and_limited_for_both() -> None:
    for container in (sidecar(), app()):
        for kind in ("requests", "limits"):
            assert cpu_cores(container["resources"][kind]["cpu"]) <= 1, container["name"]
            assert container["resources"][kind]["memory"], container["name"]


def test_both_containers_are_locked_down() -> None:
    assert pod()["securityContext"]["runAsNonRoot"] is True
    assert pod()["automountServiceAccountToken"] is False
    assert pod()["enableServiceLinks"] is False
    for container in (sidecar(), app()):
        spec = container["securityContext"]
        assert spec["readOnlyRootFilesystem"] is True, container["name"]
        assert spec["allowPrivilegeEscalation"] is False, container["name"]
        assert spec["capabilities"] == {"drop": ["ALL"]}, container["name"]


def test_ingress_sends_presence_paths_to_the_sidecar_and_the_rest_to_the_app() -> None:
    service = manifest("Service", OVERLAY)
    labels = manifest("Deployment", OVERLAY)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    name = service["metadata"]["name"]
    routes = ingress_routes(manifest("Ingress", OVERLAY))
    assert routes == {
        "/ws/presence": ("Exact", name, "presence"),
        "/client/": ("Prefix", name, "presence"),
        "/": ("Prefix", name, "http"),
    }
    assert resolve_port(ports["presence"], sidecar()["ports"]) == served_port()
    assert resolve_port(ports["http"], app()["ports"]) == int(env_value(app(), "APP_PORT"))
