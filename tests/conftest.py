from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.procs import MeshProcess, reap, spawn

SHARED_WORKER = ("tests/containers/",)  # their images are built once per session: one worker runs all of them


def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs two xdist workers (``-n 2 --dist loadgroup``): every test goes to whichever worker is
    free, but the tests under SHARED_WORKER all go to one. Done here, not with ``xdist_group`` marks: on pytest 9.2
    xdist's loadgroup silently ignores them (pytest-dev/pytest-xdist#1386; seen: both workers built the images)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Scheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            shared = next((prefix for prefix in SHARED_WORKER if nodeid.startswith(prefix)), None)
            return shared or super()._split_scope(nodeid)

    return Scheduling(config, log)


@pytest.fixture
def mesh_procs(tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    """Factory: ``mesh_procs(name, *args)`` starts ``python -m mesh ARGS``; everything is reaped at teardown."""
    started: list[MeshProcess] = []

    def start(name: str, *args: str, env: dict | None = None, module: str = "mesh") -> MeshProcess:
        process = spawn(name, list(args), tmp_path, env, module)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        reap(process)


@pytest.fixture
def bootstrap(mesh_procs, tmp_path: Path) -> str:
    """A live bootstrap node on 127.0.0.1, a free port; returns its multiaddr."""
    addr_file = tmp_path / "bootstrap.addr"
    node = mesh_procs("bootstrap", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr_file))
    node.wait_for(addr_file.exists, 60, "an address file")
    return addr_file.read_text().split()[0]


def peer_args(join: str, name: str, tmp_path: Path, *extra: str, run: str = "test", task: str | None = "regression") -> list[str]:
    args = [
        "peer",
        "--join",
        join,
        "--run",
        run,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--status-file",
        str(tmp_path / f"{name}.json"),
        "--checkpoint-dir",
        str(tmp_path / name),
        "--matchmaking-time",
        "1",
        "--averaging-timeout",
        "10",
        "--log-every",
        "2",
        "--threads",
        "1",
        # A real model's step takes tens of ms or more; the regression task's takes ~1 ms, which would let a peer
        # finish an epoch alone before hivemind's progress tracker (refreshing every >= 0.5 s) sees the others.
        "--target-batch-size",
        "512",
        "--min-step-time",
        "0.1",
    ]
    if task:
        args += ["--task", task]
    return args + list(extra)


@pytest.fixture
def private_secantus(tmp_path: Path):
    """A MongoDB wire-protocol server of this test's own, which the test may stop and start (outages, restarts)."""
    from tests.contract.conftest import PrivateSecantus

    server = PrivateSecantus(tmp_path / "secantus")
    try:
        yield server
    finally:
        server.stop()
