"""Experiment trackers (--tracker csv, tensorboard; mesh/trackers.py) on a real peer, against what the same peer
logged: every epoch's row holds the loss and lr of its progress line and, at evaluated epochs, its held-out loss;
TensorBoard's event files hold the same numbers, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.conftest import peer_args
from tests.integration.test_training import wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_csv_and_tensorboard_get_a_row_per_epoch_with_the_peers_own_numbers(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = ("--tracker", "csv", "--tracker", "tensorboard", "--eval-every", "2", "--log-every", "0.5")
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, "--max-epochs", "5", "--min-peers", "2", *trackers)) for n in ("a", "b")]
    for peer in peers:
        assert wait_exit(peer, 180) == 0, peer.output()[-3000:]
    folder = tmp_path / "a" / "trackers"  # --checkpoint-dir/trackers
    rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 5 and len(epochs) >= 4, epochs
    output = peers[0].output()
    logged = {int(e): (float(loss), float(lr)) for e, loss, lr in re.findall(r"progress epoch=(\d+) loss=(\S+) lr=(\S+)", output)}
    evaluated = {int(e): float(v) for e, v in re.findall(r"evaluated epoch=(\d+) eval_loss=(\S+)", output)}
    for row in rows:
        epoch = int(row["epoch"])
        if epoch in logged:
            assert float(row["loss"]) == pytest.approx(logged[epoch][0], abs=5e-5) and float(row["lr"]) == pytest.approx(logged[epoch][1])
        assert (row["eval_loss"] != "") == (epoch in evaluated), (epoch, row, evaluated)
        if epoch in evaluated:
            assert float(row["eval_loss"]) == pytest.approx(evaluated[epoch], rel=1e-5)
    events = EventAccumulator(str(folder))
    events.Reload()
    loss = {event.step: event.value for event in events.Scalars("loss")}
    assert sorted(loss) == epochs
    assert all(loss[int(r["epoch"])] == pytest.approx(float(r["loss"]), rel=1e-6) for r in rows)
    assert sorted(event.step for event in events.Scalars("eval_loss")) == sorted(evaluated)
