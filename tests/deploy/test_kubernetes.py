"""deploy/kubernetes: every manifest is valid against the Kubernetes schemas (offline, by
kubernetes-validate's bundled schemas), listed by the kustomization, hardened, and given a
termination grace period over the graceful-shutdown bound its ConfigMap sets."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.queue.jobs import JobKeys
from tests.deploy.paths import DEPLOY, required_tool, venv_tool

KUBERNETES = DEPLOY / "kubernetes"
# The oldest release we claim to support, and the newest the validator knows.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]
HTTP_PORT = 9464

Resource = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(text: str) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _resources() -> list[Resource]:
    return [doc for path in _manifest_files() for doc in _documents(path.read_text())]


def _one(kind: str, name: str) -> Resource:
    found = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def _config() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "flowforge")["data"]
    return data


def _workloads() -> list[Resource]:
    return [r for r in _resources() if r["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid(path: Path, version: str) -> None:
    resources = _documents(path.read_text())
    assert resources, f"{path.name} holds no resource"
    for resource in resources:
        # strict: an unknown (misspelt) field is an error, not silently dropped.
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    deployment = _one("Deployment", "flowforge-orchestrator")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == [p.name for p in _manifest_files()]


def test_kustomize_builds_valid_resources() -> None:
    kubectl = required_tool(venv_tool("kubectl"), "kubectl (to build the kustomization)")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], check=True, capture_output=True, text=True
    ).stdout
    resources = _documents(built)
    assert len(resources) == len(_resources())
    for resource in resources:
        kubernetes_validate.validate(resource, VERSIONS[-1], strict=True)
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "flowforge"
    images = {
        c["image"]
        for r in resources
        if r["kind"] in ("Deployment", "Job")
        for c in r["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"flowforge-orchestrator:0.1.0"}


@pytest.mark.parametrize(
    ("deployment", "setting"),
    [
        ("flowforge-orchestrator", "FLOWFORGE_SHUTDOWN_TIMEOUT"),
        ("flowforge-worker", "FLOWFORGE_WORKER_SHUTDOWN_GRACE"),
    ],
)
def test_grace_period_exceeds_the_shutdown_bound(deployment: str, setting: str) -> None:
    pod = _one("Deployment", deployment)["spec"]["template"]["spec"]
    # Margin past the bound: releasing leases / closing connections after it.
    assert pod["terminationGracePeriodSeconds"] >= float(_config()[setting]) + 10


def test_orchestrators_are_replicated_and_protected_from_drains() -> None:
    deployment = _one("Deployment", "flowforge-orchestrator")
    assert deployment["spec"]["replicas"] == 2
    budget = _one("PodDisruptionBudget", "flowforge-orchestrator")
    assert budget["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", ["flowforge-orchestrator", "flowforge-worker"])
def test_probes_and_metrics_port(name: str) -> None:
    template = _one("Deployment", name)["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["ports"] == [
        {"name": "http-metrics", "containerPort": HTTP_PORT, "protocol": "TCP"}
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FLOWFORGE_HTTP_PORT"] == str(HTTP_PORT)
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("livenessProbe", "readinessProbe")
    }
    assert probes == {
        "livenessProbe": ("/healthz", "http-metrics"),
        "readinessProbe": ("/readyz", "http-metrics"),
    }
    service = _one("Service", "flowforge-metrics")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"


@pytest.mark.parametrize(
    ("name", "command"), [("flowforge-orchestrator", "run"), ("flowforge-worker", "worker")]
)
def test_roles_share_one_image(name: str, command: str) -> None:
    (container,) = _one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    (migrate,) = _one("Job", "flowforge-migrate")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == migrate["image"]
    assert (container["args"], migrate["args"]) == ([command], ["migrate"])


@pytest.mark.parametrize(
    "workload", _workloads(), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}"
)
def test_pods_are_hardened(workload: Resource) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert {"requests", "limits"} <= container["resources"].keys()
        sources = [next(iter(s.values()))["name"] for s in container["envFrom"]]
        assert sources[:2] == ["flowforge", "flowforge"]  # the ConfigMap, then the Secret


def test_secret_example_holds_the_connection_urls_and_the_job_key() -> None:
    secret = _one("Secret", "flowforge")
    assert set(secret["stringData"]) == {
        "FLOWFORGE_DATABASE_URL",
        "FLOWFORGE_REDIS_URL",
        "FLOWFORGE_JOB_KEY",
    }
    with pytest.raises(ConfigError, match="placeholder"):  # deployed unchanged: refused
        JobKeys.parse(secret["stringData"]["FLOWFORGE_JOB_KEY"])
    assert not set(_config()) & set(secret["stringData"])


def test_orchestrators_and_workers_read_the_same_job_key() -> None:
    # Both Deployments take the Secret `flowforge` whole: the key that signs is the key
    # that verifies.
    for name in ("flowforge-orchestrator", "flowforge-worker"):
        container = _one("Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        assert "flowforge" in secrets
