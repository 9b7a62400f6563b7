"""The images, built with podman and run for real: a bootstrap, a coordinator and two peers on the host network train
the regression task; their averaging rounds are checked through the coordinator's API and the peers' metrics; a peer
container stops with exit 0 inside its grace period; the bootstrap's identity survives a new container on its volume.

Everything started and built here is removed at the end, except the debootstrap base image (the stand-in for a
pulled ``python:3.11-slim``, kept like any pulled base). The images are built once per session (``images`` in
conftest.py, shared with test_compose.py). docs/deployment.md records how long this takes.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from mesh import checkpoint
from tests.containers import podman as pm
from tests.procs import free_port, metric, metrics_page, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

MATCHMAKING_TIME, AVERAGING_TIMEOUT, SHUTDOWN_TIMEOUT = 1, 10, 10
# The stop grace period, as compose and Kubernetes set it: the peer's worst case with these settings (38 s).
GRACE = pm.peer_stop_bound(MATCHMAKING_TIME, AVERAGING_TIMEOUT, SHUTDOWN_TIMEOUT)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def containers():
    """Names of started containers and volumes; all removed at teardown, whatever happened."""
    started: dict[str, list[str]] = {"containers": [], "volumes": []}
    yield started
    for name in started["containers"]:
        logs = pm.podman("logs", "--tail", "30", name, check=False)
        print(f"--- {name} (last lines)\n{logs.stdout.decode(errors='replace')}{logs.stderr.decode(errors='replace')}")
        pm.podman("rm", "--force", "--volumes", "--time", "0", name, check=False)
    for name in started["volumes"]:
        pm.podman("volume", "rm", "--force", name, check=False)
    left = pm.out("ps", "--all", "--format", "{{.Names}}").split() + pm.out("volume", "ls", "--format", "{{.Name}}").split()
    assert not set(left) & set(started["containers"] + started["volumes"]), f"left behind: {left}"


def test_images_lint_clean_metadata(images):
    """Non-root numeric user, exec-form entrypoint (so SIGTERM reaches Python), a HEALTHCHECK, /data as a volume;
    the coordinator image carries no torch."""
    for target, image in images.items():
        config = pm.inspect(image)["Config"]
        assert config["User"] == "10001:10001", target
        assert config["Entrypoint"] == ["mesh"], target
        assert pm.inspect(image)["Healthcheck"]["Test"][:4] == ["CMD", "python", "-m", "mesh.probe"], target
        assert "/data" in config["Volumes"], target
    no_torch = pm.podman("run", "--rm", "--network", "none", images["coordinator"], "--help", check=False)
    assert no_torch.returncode == 0, no_torch.stderr
    probe = pm.podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python",
        images["coordinator"],
        "-c",
        "import importlib.util as u; print(u.find_spec('torch') is None and u.find_spec('hivemind') is None)",
    )
    assert probe.stdout.decode().strip() == "True"
    # Asked to watch the DHT, the small image says what it lacks instead of a traceback.
    join = pm.podman("run", "--rm", "--network", "none", images["coordinator"], "api", "--join", "/ip4/127.0.0.1/tcp/1/p2p/x", check=False)
    assert join.returncode == 2
    assert "--join needs hivemind and torch" in join.stderr.decode()


def test_bootstrap_coordinator_and_two_peer_containers_train(images, containers, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    bootstrap_port, bootstrap_metrics, api_port = free_port(), free_port(), free_port()
    peer_metrics = [free_port(), free_port()]
    volume = f"mesh-test-bootstrap-{suffix}"
    pm.podman("volume", "create", volume)
    containers["volumes"].append(volume)

    def run(name: str, image: str, env: dict[str, str], *args: str, volumes: tuple[str, ...] = ()) -> str:
        full = f"mesh-test-{name}-{suffix}"
        # Read-only root filesystem (tmpfs on /tmp), as the Kubernetes manifests run them.
        options = ["--detach", "--name", full, "--network", "host", "--read-only"]
        for key, value in {"MESH_HOST": "127.0.0.1", "MESH_LOG_FORMAT": "text", **env}.items():
            options += ["--env", f"{key}={value}"]
        for spec in volumes:
            options += ["--volume", spec]
        containers["containers"].append(full)
        pm.podman("run", *options, image, *args)
        return full

    def start_bootstrap(tag: str) -> str:
        return run(
            tag,
            images["mesh"],
            {"MESH_PORT": str(bootstrap_port), "MESH_METRICS_PORT": str(bootstrap_metrics)},
            "bootstrap",
            "--identity",
            "/data/identity.key",
            "--announce",
            f"/dns4/localhost/tcp/{bootstrap_port}",
            volumes=(f"{volume}:/data",),
        )

    bootstrap = start_bootstrap("bootstrap")
    health_url = f"http://127.0.0.1:{bootstrap_metrics}/healthz"
    first_id = wait_until(lambda: _try_json(health_url).get("peer_id"), timeout=120, what="the bootstrap's /healthz")
    # A stable DNS multiaddr, as in Kubernetes (/dns4/mesh-bootstrap-0.mesh-bootstrap/...): peers join through it.
    assert get_json(health_url)["addrs"] == [f"/dns4/localhost/tcp/{bootstrap_port}/p2p/{first_id}"]
    # Ports come from MESH_* variables, so each image's HEALTHCHECK probes the port its process bound.
    coordinator = run("coordinator", images["coordinator"], {"MESH_PORT": str(api_port)}, "api", "--bootstrap", health_url)
    api = f"http://127.0.0.1:{api_port}/api/v1"
    wait_until(lambda: _try_json(f"{api}/health").get("status") == "ok", timeout=60, what="the coordinator")

    training = [
        "--run",
        "containers",
        "--task",
        "regression",
        "--min-peers",
        "2",
        "--matchmaking-time",
        str(MATCHMAKING_TIME),
        "--averaging-timeout",
        str(AVERAGING_TIMEOUT),
        "--target-batch-size",
        "512",
        "--min-step-time",
        "0.1",
        "--threads",
        "1",
        "--coordinator",
        f"http://127.0.0.1:{api_port}",
        "--heartbeat-interval",
        "1",
    ]
    peer_env = [{"MESH_METRICS_PORT": str(port), "MESH_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)} for port in peer_metrics]
    # One peer joins through the bootstrap's health URL, the other asks the coordinator how to join.
    peers = [
        run("peer-a", images["mesh"], peer_env[0], "peer", "--join", health_url, *training),
        run("peer-b", images["mesh"], peer_env[1], "peer", *training),
    ]

    def averaged_in_pairs() -> bool:
        for port in peer_metrics:
            page = _try_page(port)
            if metric(page, "mesh_peer_averaging_rounds_total", outcome="ok") < 2:
                return False
            if metric(page, "mesh_peer_last_group_size") != 2:
                return False
        return True

    wait_until(averaged_in_pairs, timeout=240, poll=2, what="two ok averaging rounds with a group of 2 on both peers")

    # The coordinator saw the same through the peers' heartbeats (every second here).
    def both_reported() -> list[dict] | None:
        items = get_json(f"{api}/peers?run_id=containers&status=alive")["items"]
        return items if len(items) == 2 and all(peer["epoch"] >= 2 for peer in items) else None

    listed = wait_until(both_reported, timeout=30, what="two alive peers past epoch 2 in the coordinator")
    assert all(peer["version"] == "0.1.0" and peer["device"] == "cpu" for peer in listed), listed
    run_record = get_json(f"{api}/runs/containers")
    assert run_record["status"] == "running"
    assert run_record["progress"]["peers_alive"] == 2 and run_record["progress"]["epoch"] >= 2, run_record
    for port in peer_metrics:  # loss is finite and reported
        assert metric(metrics_page(port), "mesh_peer_loss") > 0

    for name in (bootstrap, coordinator, *peers):
        assert pm.podman("healthcheck", "run", name, check=False).returncode == 0, f"{name} is not healthy"
    assert pm.out("exec", peers[0], "id", "-u") == "10001"

    # SIGTERM: the peer leaves its group, writes its checkpoint and exits 0 well inside the grace period.
    started = time.monotonic()
    pm.podman("stop", "--time", str(int(GRACE)), peers[0], timeout=GRACE + 30)
    took = time.monotonic() - started
    state = pm.inspect(peers[0])["State"]
    assert state["ExitCode"] == 0, state
    assert took < GRACE, f"the peer took {took:.1f}s to stop (grace {GRACE}s): it was killed, not stopped"
    # Its final checkpoint is on its /data volume, at the epoch it had reached (nothing lost).
    pm.podman("cp", f"{peers[0]}:/data/checkpoints/checkpoint.pt", str(tmp_path / "checkpoint.pt"))
    saved = checkpoint.load(tmp_path)
    assert saved is not None and saved["epoch"] >= 2
    wait_until(
        lambda: sorted(p["status"] for p in get_json(f"{api}/peers?run_id=containers")["items"]) == ["alive", "left"],
        timeout=30,
        what="the coordinator to record one peer left and one alive",
    )

    # The bootstrap's identity lives on its volume: a new container there has the same peer id (and multiaddr).
    pm.podman("stop", "--time", "15", bootstrap, timeout=45)
    assert pm.inspect(bootstrap)["State"]["ExitCode"] == 0
    start_bootstrap("bootstrap2")
    assert wait_until(lambda: _try_json(health_url).get("peer_id"), timeout=120, what="the new bootstrap") == first_id


def _try_json(url: str) -> dict:
    try:
        return get_json(url)
    except (OSError, ValueError):
        return {}


def _try_page(port: int) -> str:
    try:
        return metrics_page(port)
    except OSError:
        return ""
