"""The kustomize layout in deploy/k8s: every overlay rendered and checked against the Kubernetes
schemas; the fleet overlay against the app (the sidecar overlay: test_k8s_sidecar.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from presence_svc.app import RELEASE_TIMEOUT
from presence_svc.settings import Settings
from presence_svc.web.rest import ROUTES
from tests.deploy.artifacts import (
    PLACEHOLDER_SECRETS,
    dockerfile,
    served_port,
    settings_from_env,
    stages,
    unknown_settings,
)
from tests.deploy.k8s import (
    K8S_OVERLAYS,
    K8S_VERSION,
    SHUTDOWN_MARGIN_S,
    container,
    cpu_cores,
    ingress_routes,
    kustomization,
    kustomizations,
    manifest,
    overlays,
    pre_stop_seconds,
    rendered,
    resolve_port,
    schema_problems,
)
from tests.support.app import app_client

ROUTE_PATHS = {route.path for route in ROUTES}


def deployment() -> dict[str, Any]:
    return manifest("Deployment")


def configmap_data() -> dict[str, str]:
    data: dict[str, str] = manifest("ConfigMap")["data"]
    return data


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def selects_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and all(pod_labels().get(k) == v for k, v in selector.items())


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What a pod of the Deployment reads: the ConfigMap plus the Secret's two values."""
    return settings_from_env(monkeypatch, {**configmap_data(), **PLACEHOLDER_SECRETS})


def test_kustomization_lists_every_manifest() -> None:
    for path in kustomizations():
        listed = [r for r in kustomization(path.parent)["resources"] if r.endswith(".yaml")]
        on_disk = [p.name for p in path.parent.glob("*.y*ml") if p.name != "kustomization.yaml"]
        assert sorted(listed) == sorted(on_disk), f"{path}: a manifest file is not listed"
        # No Secret with real values ships anywhere: it is created out of band.
        assert "secretGenerator" not in kustomization(path.parent), path
    assert overlays() == ["fleet", "sidecar"]
    for overlay in overlays():
        assert "../../base" in kustomization(K8S_OVERLAYS / overlay)["resources"], overlay
    kinds = sorted(doc["kind"] for doc in rendered("fleet"))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Ingress",
            "Ingress",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )


@pytest.mark.parametrize("overlay", overlays())
def test_every_rendered_object_matches_the_kubernetes_schema(overlay: str) -> None:
    problems = {
        f"{doc['kind']}/{doc['metadata']['name']}": schema_problems(doc)
        for doc in rendered(overlay)
    }
    assert len(problems) == len(rendered(overlay)), "two objects of one kind and name"
    assert {k: v for k, v in problems.items() if v} == {}, f"against Kubernetes {K8S_VERSION}"


def test_schema_check_rejects_misspelt_and_mistyped_fields() -> None:
    misspelt = copy.deepcopy(deployment())
    container(misspelt)["readinesProbe"] = container(misspelt).pop("readinessProbe")
    assert schema_problems(misspelt)
    mistyped = copy.deepcopy(deployment())
    mistyped["spec"]["replicas"] = "three"
    assert schema_problems(mistyped)
    unknown_kind = {"apiVersion": "v1", "kind": "Nonsense", "metadata": {"name": "x"}}
    assert schema_problems(unknown_kind)


def test_image_is_set_by_kustomize() -> None:
    images = {e["name"]: e for e in kustomization(K8S_OVERLAYS / "fleet")["images"]}
    name, _, tag = container(deployment())["image"].rpartition(":")
    assert name in images and tag == images[name]["newTag"]


def test_container_serves_the_port_the_image_serves() -> None:
    spec = container(deployment())
    (port,) = spec["ports"]
    assert port["containerPort"] == served_port()
    assert port["name"] == "http"
    # No command/args: the image's exec-form ENTRYPOINT stays PID 1 and receives SIGTERM.
    assert "command" not in spec and "args" not in spec


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")],
)
def test_probes_hit_app_routes_on_the_served_port(probe: str, path: str) -> None:
    spec = container(deployment())
    get = spec[probe]["httpGet"]
    assert get["path"] == path and path in ROUTE_PATHS
    assert resolve_port(get["port"], spec["ports"]) == served_port()


def test_probes_answer_200_on_a_node_configured_by_the_configmap(settings: Settings) -> None:
    spec = container(deployment())
    paths = {
        spec[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    with app_client(settings) as client:
        for path in sorted(paths):
            assert client.get(path).status_code == 200, path


@pytest.mark.parametrize("name", ["presence-svc", "presence-svc-studies"])
def test_service_maps_port_80_to_the_http_container_port(name: str) -> None:
    service = manifest("Service", name=name)
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 80)
    assert resolve_port(port["targetPort"], container(deployment())["ports"]) == served_port()
    assert selects_pods(service["spec"]["selector"])


def test_fleet_ingress_hashes_websockets_on_their_study() -> None:
    ingress = manifest("Ingress", name="presence-svc-studies")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$arg_study_id"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= 600, timeout
    # Only the WebSocket path, on a Service of its own: ingress-nginx keeps one balancing rule
    # per Service port, so REST through the same Service would be hashed too.
    assert ingress_routes(ingress) == {"/ws/presence": ("Exact", "presence-svc-studies", "http")}


def test_fleet_ingress_balances_rest_and_the_client_without_a_hash() -> None:
    ingress = manifest("Ingress", name="presence-svc")
    annotations = ingress["metadata"].get("annotations", {})
    assert not [a for a in annotations if "hash" in a or "affinity" in a]
    routes = ingress_routes(ingress)
    assert routes == {
        "/presence": ("Prefix", "presence-svc", "http"),
        "/client/": ("Prefix", "presence-svc", "http"),
    }
    assert "/presence/{study_id}" in ROUTE_PATHS and "/presence/heartbeat" in ROUTE_PATHS
    hosts = {
        rule["host"]
        for doc in rendered()
        if doc["kind"] == "Ingress"
        for rule in doc["spec"]["rules"]
    }
    assert len(hosts) == 1, "both Ingresses serve one host"


def test_grace_period_covers_pre_stop_drain_and_lease_release(settings: Settings) -> None:
    pod = deployment()["spec"]["template"]["spec"]
    pre_stop = pre_stop_seconds(container(deployment()))
    assert pre_stop >= 3, "endpoints need a few seconds to drop the pod before it stops"
    needed = pre_stop + settings.drain_timeout + RELEASE_TIMEOUT + SHUTDOWN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_pre_stop_reader_understands_both_hook_forms() -> None:
    assert pre_stop_seconds({"lifecycle": {"preStop": {"sleep": {"seconds": 7}}}}) == 7
    assert pre_stop_seconds({"lifecycle": {"preStop": {"exec": {"command": ["sleep", "4"]}}}}) == 4
    assert pre_stop_seconds({}) == 0


def test_drain_timeout_comes_explicitly_from_the_configmap() -> None:
    spec = container(deployment())
    configmap = manifest("ConfigMap")["metadata"]["name"]
    env = {e["name"]: e for e in spec["env"]}
    ref = env["PRESENCE_DRAIN_TIMEOUT"]["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == configmap and ref["key"] in configmap_data()
    assert [e["configMapRef"]["name"] for e in spec["envFrom"]] == [configmap]


def test_secrets_come_from_a_secret_reference() -> None:
    env = {e["name"]: e for e in container(deployment())["env"]}
    for name in ("PRESENCE_JWT_SECRET", "PRESENCE_REDIS_URL"):
        assert "value" not in env[name], f"{name} must not be written into the manifest"
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "presence-svc-secrets"
        assert name not in configmap_data()


def test_every_env_name_is_a_setting() -> None:
    names = [e["name"] for e in container(deployment())["env"]]
    assert unknown_settings([*names, *configmap_data()]) == []
    assert unknown_settings(["PRESENCE_DRAIN_TIMEOUTS"]) == [
        "PRESENCE_DRAIN_TIMEOUTS is not a setting"
    ]


def test_configmap_validates_as_settings(settings: Settings) -> None:
    assert settings.drain_timeout == float(configmap_data()["PRESENCE_DRAIN_TIMEOUT"])
    assert settings.study_grant_required


def test_security_context_is_locked_down() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    spec = container(deployment())["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["runAsNonRoot"] is True
    assert spec["readOnlyRootFilesystem"] is True
    assert spec["allowPrivilegeEscalation"] is False
    assert spec["capabilities"]["drop"] == ["ALL"]
    assert "add" not in spec["capabilities"]
    assert spec["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


def test_pod_user_is_the_image_user() -> None:
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    (user,) = [i.args for i in stages(dockerfile())[-1] if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert pod["runAsUser"] == int(uid)
    assert pod["runAsGroup"] == int(gid or uid)


def test_resources_about_one_cpu() -> None:
    resources = container(deployment())["resources"]
    for kind in ("requests", "limits"):
        assert 0.5 <= cpu_cores(resources[kind]["cpu"]) <= 2, kind
        assert resources[kind]["memory"]
    assert cpu_cores("500m") == 0.5


def test_replicas_spread_and_disruption_budget() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] == 3
    assert selects_pods(spec["selector"]["matchLabels"])
    constraints = spec["template"]["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert "kubernetes.io/hostname" in keys
    for constraint in constraints:
        assert selects_pods(constraint["labelSelector"]["matchLabels"])
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert selects_pods(pdb["selector"]["matchLabels"])
    # Never all of them: either a max unavailable below the count or a min available above 0.
    if "maxUnavailable" in pdb:
        assert 0 < pdb["maxUnavailable"] < spec["replicas"]
    else:
        assert 0 < pdb["minAvailable"] < spec["replicas"]


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = manifest("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment()["metadata"]["name"])
    assert (
        hpa["spec"]["minReplicas"] <= deployment()["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(deployment())["resources"]["requests"], "utilisation needs a request"


def test_network_policy_allows_http_in_and_redis_and_dns_out() -> None:
    policy = manifest("NetworkPolicy")["spec"]
    assert selects_pods(policy["podSelector"]["matchLabels"])
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]

    def ports(rules: list[dict[str, Any]]) -> Iterator[tuple[int, str]]:
        for rule in rules:
            assert rule.get("ports"), "every rule must name its ports"
            for port in rule["ports"]:
                yield port["port"], port.get("protocol", "TCP")

    assert set(ports(policy["ingress"])) == {(served_port(), "TCP")}
    assert set(ports(policy["egress"])) == {(6379, "TCP"), (53, "UDP"), (53, "TCP")}
