"""The bootstrap node, `mesh doctor` and `mesh up` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.integration.test_cli_errors import mesh
from tests.procs import REPO, alive, free_port, http_server, promtool_check_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s


def test_bootstrap_keeps_its_address_across_restarts_and_serves_health(mesh_procs, tmp_path: Path) -> None:
    identity, addr_file, port, http_port = tmp_path / "id.key", tmp_path / "addr", free_port(), free_port()
    args = [
        "bootstrap",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--identity",
        str(identity),
        "--address-file",
        str(addr_file),
        "--metrics-port",
        str(http_port),
    ]
    first = mesh_procs("bootstrap-1", *args)
    first.wait_for(addr_file.exists, 60, "an address file")
    address = addr_file.read_text().split()[0]
    assert address.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/")
    assert f"mesh peer --join {address}" in first.output()  # prints the exact join command
    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10))
    assert health["status"] == "ok" and address in health["addrs"]
    metrics = promtool_check_metrics(f"http://127.0.0.1:{http_port}/metrics")
    assert "mesh_build_info{" in metrics and 'role="bootstrap"' in metrics and "mesh_process_uptime_seconds" in metrics

    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    addr_file.unlink()
    second = mesh_procs("bootstrap-2", *args, "--log-format", "json")
    second.wait_for(addr_file.exists, 60, "an address file")
    assert addr_file.read_text().split()[0] == address  # same identity, same port: the same multiaddr
    # JSON logs: one object per line, the role on every record, the peer id once the DHT is up, the message's
    # key=value pairs as typed fields (issue 10)
    records = [json.loads(line) for line in second.output().splitlines() if line.startswith("{")]
    assert records and all(r["role"] == "bootstrap" and r["level"] and r["message"] for r in records)
    config_line = next(r for r in records if r["message"].startswith("bootstrap config"))
    assert config_line["port"] == port and config_line["log_format"] == "json"
    assert any(r.get("peer_id") == address.rsplit("/", 1)[1] for r in records), records


def test_doctor_reports_in_plain_words(bootstrap: str) -> None:
    result = mesh("doctor", "--join", bootstrap, "--host", "127.0.0.1", "--join-timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[  ok] address parses" in out
    assert "[  ok] the libp2p daemon starts" in out
    assert "[  ok] the bootstrap answers" in out
    assert "[  ok] this host is reachable from the bootstrap" in out
    assert "only loopback addresses are visible" in out  # true on 127.0.0.1, and said so


def test_doctor_through_a_health_url_needs_one_answering_address(bootstrap: str) -> None:
    """A bootstrap's /healthz lists addresses some of which are unreachable from elsewhere (loopback, container
    addresses): doctor tries them in turn, warns about the dead one and passes on the live one."""
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{bootstrap.rsplit('/', 1)[1]}"
    body = json.dumps({"status": "ok", "addrs": [dead, bootstrap]}).encode()
    with http_server([(200, body)]) as base:
        result = mesh("doctor", "--join", f"{base}/healthz", "--host", "127.0.0.1", "--join-timeout", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[warn] the bootstrap at {dead} does not answer" in result.stdout
    assert "[  ok] the bootstrap answers" in result.stdout and "[  ok] all checks passed" in result.stdout


def test_doctor_fails_clearly_on_a_dead_bootstrap_and_a_bad_address() -> None:
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/12D3KooWSB3L5TWVTFUmLUg2LRtbYVZtYCjmsACqFCiXUvLF9sJ8"
    result = mesh("doctor", "--join", dead, "--host", "127.0.0.1", "--join-timeout", "3")
    assert result.returncode == 1 and "[FAIL] the bootstrap at" in result.stdout and "does not answer" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    result = mesh("doctor", "--join", "nonsense")
    assert result.returncode == 1 and "[FAIL] invalid multiaddr 'nonsense'" in result.stdout


def test_mesh_up_runs_bounded_epochs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "up"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh",
            "up",
            "--task",
            "demo",
            "--peers",
            "2",
            "--max-epochs",
            "2",
            "--target-batch-size",
            "128",
            "--matchmaking-time",
            "1",
            "--api-port",
            "0",
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=30)
    finally:
        for pid in [proc.pid, *seen]:  # mesh up and each of its children lead their own process group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
    assert proc.returncode == 0, out
    assert "mesh up: bootstrap at /ip4/127.0.0.1/tcp/" in out
    assert "epoch=2 " in out and "last_group=2" in out  # progress lines, with averaging across both peers
    assert "status page: http://127.0.0.1:" in out
    assert "stopped bootstrap=0 coordinator=0 peer-0=0 peer-1=0" in out
    # the run is protected by a secret mesh up made (docs/security.md); it says how to join with it
    secret_file = workdir / "run.secret"
    assert (secret_file.stat().st_mode & 0o777) == 0o600 and len(secret_file.read_text().strip()) >= 16
    assert f"join from another terminal with: MESH_RUN_SECRET=$(cat {secret_file}) mesh peer --join" in out
    assert all("protected=True" in (workdir / f"peer-{index}.log").read_text() for index in (0, 1))
    assert any("p2pd" in " ".join(psutil.Process(pid).cmdline()) for pid in alive(seen)) is False
    deadline = time.monotonic() + 10
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(seen) == set(), f"left behind: {alive(seen)}"
    assert len(seen) >= 7  # bootstrap + coordinator + 2 peers, each with its own libp2p daemon: we really watched them
    for index in (0, 1):
        status = json.loads((workdir / f"peer-{index}.json").read_text())
        assert status["epoch"] == 2 and status["state"] == "left"
