from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.procs import MeshProcess, reap, spawn


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
