from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.procs import MeshProcess, reap, spawn


@pytest.fixture
def mesh_procs(tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    """Factory: ``mesh_procs(name, *args)`` starts ``python -m mesh ARGS``; everything is reaped at teardown
    (``mesh_procs.adopt(process)`` adds one started elsewhere)."""
    started: list[MeshProcess] = []

    def start(name: str, *args: str, env: dict | None = None, module: str = "mesh") -> MeshProcess:
        process = spawn(name, list(args), tmp_path, env, module)
        started.append(process)
        return process

    start.adopt = started.append  # type: ignore[attr-defined]
    yield start
    for process in reversed(started):
        reap(process)


class _Bootstraps:
    """Each test gets a bootstrap node of its own, started while the test before it ran: a start is ~2.5 s of imports
    and the DHT's, and most tests use one. The spare starts a few seconds into the test that took the last one, when
    that test's own processes have started (not competing with them for the 2 cores)."""

    DELAY = 5.0

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.count = workdir, 0
        self.spare: tuple[MeshProcess, Path] | None = None
        self.timer = threading.Timer(0, self._fill)
        self.timer.start()

    def _fill(self) -> None:
        self.count += 1
        addr_file = self.workdir / f"bootstrap{self.count}.addr"
        args = ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr_file)]
        self.spare = spawn(f"bootstrap{self.count}", args, self.workdir), addr_file

    def take(self) -> tuple[MeshProcess, str]:
        self.timer.cancel()
        self.timer.join()  # a start under way finishes
        if self.spare is None:
            self._fill()
        assert self.spare is not None
        (node, addr_file), self.spare = self.spare, None
        self.timer = threading.Timer(self.DELAY, self._fill)
        self.timer.start()
        node.wait_for(addr_file.exists, 60, "an address file")
        return node, addr_file.read_text().split()[0]

    def close(self) -> None:
        self.timer.cancel()
        self.timer.join()
        if self.spare is not None:
            reap(self.spare[0])


@pytest.fixture(scope="session")
def _bootstraps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Bootstraps]:
    pool = _Bootstraps(tmp_path_factory.mktemp("bootstraps"))
    yield pool
    pool.close()


@pytest.fixture
def bootstrap(mesh_procs, _bootstraps: _Bootstraps) -> str:
    """A live bootstrap node of this test's own on 127.0.0.1, a free port; returns its multiaddr. Reaped with the
    test's other processes, after them."""
    node, address = _bootstraps.take()
    mesh_procs.adopt(node)
    return address


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
