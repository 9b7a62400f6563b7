"""A real Prometheus scrapes a live mesh (bootstrap + 2 peers + coordinator); every shipped dashboard panel query
returns data, every alert expression evaluates, the metrics move as they should, and a killed peer makes the
"peer lost" alert expression true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import peer_args
from tests.procs import REPO, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s

DASHBOARDS = REPO / "docker" / "grafana" / "dashboards"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def panel_queries() -> list[tuple[str, str]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']}", target["expr"].replace("$run", ".*")))
    return found


def alert_rules() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture
def prometheus(tmp_path: Path):
    """Starts Prometheus on 127.0.0.1 with a scrape config written by the test; yields (base_url, configure)."""
    port = free_port()
    processes: list[subprocess.Popen] = []

    def start(targets: dict[str, list[str]]) -> str:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]} for job, addrs in targets.items()],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(tmp_path / "prometheus.log", "wb") as log:  # the child has its own copy of the descriptor
            processes.append(
                subprocess.Popen(
                    [
                        "prometheus",
                        f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(base), 60, "Prometheus ready", poll=1)
        return base

    yield start
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _ready(base: str) -> bool:
    try:
        return urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200
    except OSError:
        return False


def test_prometheus_scrapes_the_mesh_and_every_panel_and_alert_evaluates(mesh_procs, prometheus, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("bootstrap", "a", "b")}
    addr_file, url_file = tmp_path / "bootstrap.addr", tmp_path / "api.url"
    boot = mesh_procs(
        "bootstrap",
        "bootstrap",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--address-file",
        str(addr_file),
        "--metrics-port",
        str(ports["bootstrap"]),
    )
    boot.wait_for(addr_file.exists, 60, "an address file")
    join = addr_file.read_text().split()[0]
    api = mesh_procs(
        "coordinator",
        "api",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db-path",
        str(tmp_path / "c.db"),
        "--bootstrap",
        join,
        "--address-file",
        str(url_file),
        "--heartbeat-interval",
        "1",
    )
    api.wait_for(url_file.exists, 60, "its address")
    coordinator = url_file.read_text().strip()
    peers = {
        name: mesh_procs(
            name,
            *peer_args(
                join,
                name,
                tmp_path,
                "--min-peers",
                "2",
                "--coordinator",
                coordinator,
                "--heartbeat-interval",
                "1",
                "--metrics-port",
                str(ports[name]),
            ),
        )
        for name in ("a", "b")
    }
    base = prometheus(
        {
            "mesh-bootstrap": [f"127.0.0.1:{ports['bootstrap']}"],
            "mesh-coordinator": [coordinator.removeprefix("http://")],
            "mesh-peer": [f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}"],
        }
    )
    peers["a"].wait_epoch(4, timeout=180)
    time.sleep(5)  # a few more scrapes after the last rounds

    up = query(base, "up")["data"]["result"]
    assert len(up) == 4 and all(series["value"][1] == "1" for series in up), up

    empty = []
    for title, expr in panel_queries():
        answer = query(base, expr)
        assert answer["status"] == "success", (title, expr, answer)
        if not answer["data"]["result"]:
            empty.append(title)
    assert empty == [], f"dashboard panels with no data: {empty}"
    for name, expr in alert_rules():
        assert query(base, expr)["status"] == "success", name

    # the metrics move: rounds and bytes counted on both peers
    for series in (
        'mesh_peer_averaging_rounds_total{outcome="ok"}',
        "mesh_peer_averaging_sent_bytes_total",
        "mesh_peer_averaging_received_bytes_total",
    ):
        result = query(base, series)["data"]["result"]
        assert len(result) == 2 and all(float(r["value"][1]) > 0 for r in result), (series, result)

    # a killed peer makes the "peer lost" alert expression true
    lost_expr = dict(alert_rules())["MeshPeerLost"]
    assert query(base, lost_expr)["data"]["result"] == []
    peers["b"].remember_descendants()
    os.killpg(peers["b"].proc.pid, signal.SIGKILL)
    wait_until(lambda: query(base, lost_expr)["data"]["result"], 60, "MeshPeerLost expression true", poll=1)
