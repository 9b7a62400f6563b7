"""A task's DataLoader on real peers (mesh/data.py): iterated again every pass with ``set_epoch``, on two peers at
once, and a peer restarted with the same identity goes on with the very batches it had not drawn (reference: the
sampler's own order, tests/integration/loader_task.py), neither replaying its data nor skipping any."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import peer_args
from tests.integration.loader_task import SAMPLES, order
from tests.integration.test_training import wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TASK = "tests.integration.loader_task:task"


def drawn(log: Path) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in line.split()) for line in log.read_text().splitlines()]


def test_a_dataloader_runs_passes_on_two_peers_and_a_restart_goes_on_where_it_stopped(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    logs = {name: tmp_path / f"{name}.data" for name in ("a", "b")}

    def peer(name: str, epochs: int, *extra: str):
        args = peer_args(bootstrap, name, tmp_path, "--max-epochs", str(epochs), "--target-batch-size", "64", *extra, task=TASK)
        return mesh_procs(name, *args, "--identity", str(tmp_path / f"{name}.key"), env={"MESH_TEST_DATA_LOG": str(logs[name])})

    peers = [peer(name, 8, "--min-peers", "2") for name in ("a", "b")]
    for process in peers:
        assert wait_exit(process, 180) == 0, process.output()[-3000:]
    for name in ("a", "b"):
        keys = drawn(logs[name])
        passes = len(keys) / SAMPLES
        assert passes >= 3, (name, len(keys))  # 8 epochs of 64 samples over two peers: about 4 passes each
        assert keys == order(int(passes) + 1)[: len(keys)]  # each pass whole, in the sampler's order for that pass
    first = drawn(logs["a"])
    logs["a"].rename(tmp_path / "a-first.data")
    (tmp_path / "a.log").rename(tmp_path / "a-first.log")

    again = peer("a", 11)
    assert wait_exit(again, 180) == 0, again.output()[-3000:]
    assert "resumed from checkpoint" in again.output() and "data fast-forwarded" in again.output(), again.output()[-3000:]
    second = drawn(logs["a"])
    assert second and not set(first) & set(second)  # nothing trained on twice
    assert first + second == order(20)[: len(first) + len(second)]  # and nothing skipped
