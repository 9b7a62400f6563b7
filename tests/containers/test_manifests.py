"""Offline checks of the deployment files: hadolint on every Dockerfile, the compose file against the Compose
specification's schema, every kustomize overlay rendered and validated against Kubernetes' schemas, and the
contracts between them (grace periods longer than the processes' worst-case stop, probes, GPU requests)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mesh.config import PeerConfig
from tests.containers.podman import REAP_SECONDS, peer_stop_bound
from tests.procs import REPO

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.parent for p in (DOCKER / "k8s" / "overlays").glob("*/kustomization.yaml"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def stop_bound(env: dict) -> float:
    """The peer's worst-case exit after SIGTERM with this environment (PeerConfig's defaults where unset)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PeerConfig)}

    def setting(name: str) -> float:
        return float(env.get(f"MESH_{name.upper()}") or defaults[name])

    return peer_stop_bound(setting("matchmaking_time"), setting("averaging_timeout"), setting("shutdown_timeout"))


# mesh bootstrap: its DHT node stops within 10 s (bootstrap/main.py), then its daemons are reaped.
BOOTSTRAP_STOP_BOUND = 10.0 + REAP_SECONDS


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module", params=[p.name for p in OVERLAYS])
def rendered(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomize overlays (`kubectl kustomize`)"
    result = run(kubectl, "kustomize", str(DOCKER / "k8s" / "overlays" / request.param))
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(result.stdout)
    return request.param, path, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_overlays_exist():
    assert [p.name for p in OVERLAYS] == ["cpu", "gpu"]


# docker/'s, and the compose test's stand-ins for images that cannot be pulled here (tests/containers/images/).
DOCKERFILES = sorted(DOCKER.rglob("Dockerfile*")) + sorted((REPO / "tests" / "containers" / "images").glob("Dockerfile.*"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile):
    result = run(str(BIN / "hadolint"), "--failure-threshold", "info", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification():
    result = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_bad_file(tmp_path):
    """The schema check above can fail: a misspelt service key is refused."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  peer:\n    image: mesh\n    stop_grace_periode: 30s\n")
    result = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0 and "stop_grace_periode" in result.stdout + result.stderr


def test_compose_services_and_contracts(compose):
    services = compose["services"]
    assert set(services) == {"mongo", "bootstrap", "coordinator", "peer", "peer-gpu", "prometheus", "grafana"}
    for name in ("peer", "peer-gpu"):
        peer = services[name]
        assert seconds(peer["stop_grace_period"]) > stop_bound(peer["environment"]), name
        assert "ports" not in peer, "peers must scale (--scale peer=N): no fixed host ports"
    assert seconds(services["bootstrap"]["stop_grace_period"]) > BOOTSTRAP_STOP_BOUND
    gpu = services["peer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "mongo-data:/data/db" in services["mongo"]["volumes"]
    assert any(v.endswith(":/data") for v in services["bootstrap"]["volumes"])
    assert "/data/identity.key" in services["bootstrap"]["command"]
    assert "31337:31337" in services["bootstrap"]["ports"]
    # Prometheus and Grafana are provisioned from the observability files, which exist.
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), volume
    # (tests/unit/test_observability_files.py checks that Prometheus scrapes these service names.)
    assert services["coordinator"]["environment"]["MESH_BOOTSTRAP"] == "http://bootstrap:9100/healthz"


def test_kubernetes_manifests_validate(rendered):
    name, path, _ = rendered
    result = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path))
    assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_kubernetes_validate_catches_a_bad_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: x}\nspec: {replicas: two}\n")
    result = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert result.returncode != 0


def _workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("StatefulSet", "Deployment")}


def test_kubernetes_contracts(rendered):
    name, _, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("StatefulSet", "mesh-bootstrap"),
        ("StatefulSet", "mesh-peer"),
        ("Deployment", "mesh-coordinator"),
        ("Service", "mesh-coordinator"),
        ("StatefulSet", "mesh-mongo"),
    } <= kinds
    workloads = _workloads(docs)
    for workload in workloads.values():
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{workload['metadata']['name']} has no {probe}"
            assert "requests" in container["resources"] and "memory" in container["resources"]["limits"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    bootstrap = workloads["mesh-bootstrap"]
    assert bootstrap["spec"]["replicas"] == 1
    assert bootstrap["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    args = bootstrap["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--identity") + 1].startswith("/data/")
    assert args[args.index("--announce") + 1].startswith("/dns4/mesh-bootstrap-0.mesh-bootstrap/")
    assert bootstrap["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > BOOTSTRAP_STOP_BOUND
    peer = workloads["mesh-peer"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in peer["containers"][0]["env"]}
    assert peer["terminationGracePeriodSeconds"] > stop_bound(env)
    assert env["MESH_JOIN"] == "http://mesh-bootstrap-0.mesh-bootstrap:9100/healthz"
    gpus = peer["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    if name == "gpu":
        assert gpus == 1 and env["MESH_DEVICE"] == "cuda" and peer["containers"][0]["image"].startswith("mesh-gpu:")
    else:
        assert gpus is None
