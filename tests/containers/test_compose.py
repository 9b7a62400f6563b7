"""docker/compose.yaml, run for real with podman-compose: what a user checks after ``MESH_PEERS=2 ... up``.

The images are the ones test_images.py runs (built once per session, conftest.py), tagged with a version of this
test's own (``MESH_VERSION``), so compose.yaml's ``mesh:${MESH_VERSION}`` images are used without a rebuild. The
test-only override (compose.override.yaml) swaps only what no registry serves here: MongoDB (SecantusDB, a MongoDB
wire-protocol server), Prometheus (Debian's package), Grafana (left out); and a second override written here publishes
the ports on 127.0.0.1, on ports picked free. Everything else is compose.yaml's: the bridge network with service DNS
(netavark + aardvark-dns), the peers joining through ``http://bootstrap:9100/healthz``, the coordinator on the MongoDB
wire protocol, Prometheus's config and alert rules from docker/prometheus/, the volumes.

Checked: the bootstrap's /healthz and HEALTHCHECK; both peers average in groups of 2 (their /metrics, and the same
through Prometheus); the coordinator's REST API lists both peers alive; Prometheus's /api/v1/targets has every target
up; ``down -v`` leaves no container, volume, network or pod of the project. docs/deployment.md records how long it takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.containers import podman as pm
from tests.procs import REPO, free_port, metric, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

COMPOSE = [str(Path(sys.executable).parent / "podman-compose")]
OVERRIDE = REPO / "tests" / "containers" / "compose.override.yaml"
PROJECT_LABEL = "io.podman.compose.project"
# podman-compose 1.6's `down --volumes` removes the project's named volumes but not the anonymous ones that images
# declare with VOLUME (each peer's /data): it runs `podman rm` without --volumes (containers/podman-compose#1521, fix
# in #1553, unreleased). This passes --volumes to its `podman rm`, as docs/deployment.md tells podman-compose users to.
PODMAN_COMPOSE_OPTIONS = ["--podman-rm-args=--volumes"]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def try_json(url: str) -> dict:
    try:
        return get_json(url)
    except (OSError, ValueError):
        return {}


class Stack:
    """One compose project: ``podman-compose -p NAME -f docker/compose.yaml -f OVERRIDE -f PORTS ...``."""

    def __init__(self, name: str, files: list[Path], env: dict[str, str], ports: dict[str, int]) -> None:
        self.name = name
        self.files = files
        self.env = {**pm.podman_env(), **env}
        self.ports = ports
        self.anonymous_volumes: set[str] = set()
        """The anonymous volumes of its containers (each peer's /data): unlabelled, so known only by name."""

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        command = [*COMPOSE, *PODMAN_COMPOSE_OPTIONS, "--project-name", self.name]
        for path in self.files:
            command += ["--file", str(path)]
        result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def containers(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label={PROJECT_LABEL}={self.name}"]
        if service:
            filters += ["--filter", f"label=io.podman.compose.service={service}"]
        return sorted(pm.out("ps", "--all", *filters, "--format", "{{.Names}}").split())

    def remember_volumes(self) -> None:
        for name in self.containers():
            self.anonymous_volumes |= {m["Name"] for m in pm.inspect(name)["Mounts"] if m["Type"] == "volume"}

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label={PROJECT_LABEL}={self.name}"
        named = set(pm.out("volume", "ls", "--filter", label, "--format", "{{.Name}}").split())
        anonymous = set(pm.out("volume", "ls", "--format", "{{.Name}}").split()) & self.anonymous_volumes
        return {
            "containers": self.containers(),
            "volumes": sorted(named | anonymous),
            "networks": [n for n in pm.out("network", "ls", "--format", "{{.Name}}").split() if n.startswith(f"{self.name}_")],
            "pods": [p for p in pm.out("pod", "ls", "--format", "{{.Name}}").split() if p == f"pod_{self.name}"],
        }

    def exec_metrics(self, container: str) -> str:
        """A peer's /metrics from inside its container (peers publish no host port: replicas would collide)."""
        script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=3).read().decode())"
        result = pm.podman("exec", container, "python", "-c", script, check=False, timeout=30)
        return result.stdout.decode(errors="replace") if result.returncode == 0 else ""

    def remove_everything(self) -> None:
        """After a failure: whatever ``down -v`` did not remove, removed by label and by name."""
        for name in self.containers():
            pm.podman("rm", "--force", "--volumes", "--time", "0", name, check=False)
        left = self.leftovers()
        for pod in left["pods"]:
            pm.podman("pod", "rm", "--force", pod, check=False)
        for volume in left["volumes"]:
            pm.podman("volume", "rm", "--force", volume, check=False)
        for network in left["networks"]:
            pm.podman("network", "rm", "--force", network, check=False)


@pytest.fixture
def stack(images, stand_in_images, tmp_path):
    """docker/compose.yaml with the test override, as a project of this test's own; torn down whatever happened."""
    suffix = uuid.uuid4().hex[:8]
    version = f"compose-test-{suffix}"
    # compose.yaml's image names, at this test's version: the images test_images.py runs, not rebuilt.
    tags = [f"localhost/mesh:{version}", f"localhost/mesh-coordinator:{version}"]
    pm.podman("tag", images["mesh"], tags[0])
    pm.podman("tag", images["coordinator"], tags[1])
    ports = {"bootstrap": free_port(), "bootstrap_metrics": free_port(), "api": free_port(), "prometheus": free_port()}
    published = tmp_path / "ports.yaml"
    published.write_text(
        "# Written by tests/containers/test_compose.py: host ports on 127.0.0.1 only, picked free.\n"
        "services:\n"
        f"  bootstrap:\n    ports: ['127.0.0.1:{ports['bootstrap']}:31337', '127.0.0.1:{ports['bootstrap_metrics']}:9100']\n"
        f"  coordinator:\n    ports: ['127.0.0.1:{ports['api']}:8080']\n"
        f"  prometheus:\n    ports: ['127.0.0.1:{ports['prometheus']}:9090']\n"
    )
    # Debian's Prometheus has no Kubernetes discovery and refuses a config that uses it: the same config less that job.
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    config["scrape_configs"] = [job for job in config["scrape_configs"] if "kubernetes_sd_configs" not in job]
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump(config, sort_keys=False))
    prometheus_config.chmod(0o644)
    env = {
        "MESH_VERSION": version,
        "MESH_TEST_PROMETHEUS_CONFIG": str(prometheus_config),
        "MESH_TEST_PROMETHEUS_IMAGE": stand_in_images["prometheus"],
        "MESH_TEST_SECANTUS_IMAGE": stand_in_images["secantus"],
        # compose.yaml's own knobs: two peers (podman-compose's `down` counts replicas from the file, so MESH_PEERS
        # rather than `up --scale peer=2`, which it would not see), one torch thread each on this 2-core machine.
        "MESH_PEERS": "2",
        "MESH_THREADS": "1",
    }
    project = Stack(f"mesh-compose-test-{suffix}", [REPO / "docker" / "compose.yaml", OVERRIDE, published], env, ports)
    try:
        yield project
    finally:
        project.remember_volumes()
        for name in project.containers():
            logs = pm.podman("logs", "--tail", "25", name, check=False)
            print(f"--- {name} (last lines)\n{logs.stdout.decode(errors='replace')}{logs.stderr.decode(errors='replace')}")
        project.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False, timeout=300)
        left = project.leftovers()
        project.remove_everything()
        for tag in tags:
            pm.podman("untag", tag, tag, check=False)  # this name only: `untag IMAGE` alone drops all of its names
        assert not any(left.values()), f"left behind after the teardown's down -v: {left}"


def test_compose_stack_with_two_peers_trains_and_down_leaves_nothing(stack):
    ports = stack.ports
    started = time.monotonic()
    stack.compose("up", "--detach", timeout=300)
    print(f"\nup returned after {time.monotonic() - started:.1f}s")
    services = {service: stack.containers(service) for service in ("mongo", "bootstrap", "coordinator", "peer", "prometheus")}
    assert all(len(names) == (2 if service == "peer" else 1) for service, names in services.items()), services
    assert stack.containers("grafana") == []  # left out by the override: it cannot be pulled here
    peers = services["peer"]
    stack.remember_volumes()

    # The bootstrap: /healthz answers with its peer id and addresses, and its image's HEALTHCHECK passes.
    healthz = f"http://127.0.0.1:{ports['bootstrap_metrics']}/healthz"
    health = wait_until(lambda: (page := try_json(healthz)).get("peer_id") and page, timeout=120, what="the bootstrap's /healthz")
    assert health["status"] == "ok" and health["addrs"], health
    assert pm.podman("healthcheck", "run", services["bootstrap"][0], check=False).returncode == 0

    # Both peers train and average in groups of 2 (their own /metrics).
    def averaged_in_pairs() -> bool:
        for name in peers:
            page = stack.exec_metrics(name)
            if metric(page, "mesh_peer_averaging_rounds_total", outcome="ok") < 2 or metric(page, "mesh_peer_last_group_size") != 2:
                return False
        return True

    wait_until(averaged_in_pairs, timeout=300, poll=3, what="two ok averaging rounds with a group of 2 on both peers")
    print(f"two peers averaged in pairs after {time.monotonic() - started:.1f}s")

    # The coordinator (on the MongoDB wire protocol) lists both peers, alive, through its REST API.
    api = f"http://127.0.0.1:{ports['api']}/api/v1"

    def both_listed() -> list[dict] | None:
        items = try_json(f"{api}/peers?run_id=demo&status=alive").get("items", [])
        return items if len(items) == 2 else None

    listed = wait_until(both_listed, timeout=60, what="two alive peers in the coordinator's /api/v1/peers")
    assert all(peer["version"] == "0.1.0" and peer["device"] == "cpu" for peer in listed), listed
    assert get_json(f"{api}/ready").get("status") == "ready"  # its MongoDB store answers

    # Prometheus scrapes every target: itself, the bootstrap, the coordinator and both peers (DNS service discovery).
    prometheus = f"http://127.0.0.1:{ports['prometheus']}/api/v1"

    seen: list[dict] = []

    def all_targets_up() -> list[dict] | None:
        active = seen[:] = try_json(f"{prometheus}/targets?state=active").get("data", {}).get("activeTargets", [])
        jobs = sorted(t["labels"]["job"] for t in active)
        if jobs != ["mesh-bootstrap", "mesh-coordinator", "mesh-peer", "mesh-peer", "prometheus"]:
            return None
        return active if all(t["health"] == "up" for t in active) else None

    try:
        targets = wait_until(all_targets_up, timeout=90, poll=2, what="every Prometheus target up")
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in seen]}") from None
    print(f"every Prometheus target up after {time.monotonic() - started:.1f}s: {sorted(t['scrapeUrl'] for t in targets)}")

    # And what a dashboard would show: both peers' last group size, 2, as Prometheus scraped it.
    def pairs_in_prometheus() -> bool:
        query = urllib.parse.quote('mesh_peer_last_group_size{job="mesh-peer"}')
        result = try_json(f"{prometheus}/query?query={query}").get("data", {}).get("result", [])
        return sorted(float(r["value"][1]) for r in result) == [2.0, 2.0]

    wait_until(pairs_in_prometheus, timeout=60, poll=2, what="both peers' group size of 2 in Prometheus")
    # Every health check compose sets or the images carry (prometheus has none): the mongo stand-in's is the override's.
    for name in (services["mongo"][0], services["coordinator"][0], *peers):
        assert pm.podman("healthcheck", "run", name, check=False).returncode == 0, f"{name} is not healthy"

    # down -v: nothing of the project is left (containers, named and anonymous volumes, network, pod).
    down_started = time.monotonic()
    stack.compose("down", "--volumes", timeout=300)
    print(f"down -v took {time.monotonic() - down_started:.1f}s; the whole stack {time.monotonic() - started:.1f}s")
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": [], "pods": []}
