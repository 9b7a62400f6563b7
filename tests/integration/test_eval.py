"""Evaluation on held-out data (--eval-every, a task's ``evaluate``) on real peers, against the reference: the
regression task's held-out MSE of the very parameters the peer ended with (the tests' ``eval_loss``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.conftest import peer_args
from tests.integration.test_training import eval_loss, wait_exit
from tests.procs import free_port, metric, metrics_page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_peers_evaluate_every_n_epochs_and_report_the_held_out_loss_of_their_parameters(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    port = free_port()
    common = ("--max-epochs", "6", "--min-peers", "2", "--eval-every", "2")
    peers = [
        mesh_procs(name, *peer_args(bootstrap, name, tmp_path, *common, *extra))
        for name, extra in (("a", ("--metrics-port", str(port))), ("b", ()))
    ]
    peers[0].wait_epoch(3, timeout=180)
    live = metric(metrics_page(port), "mesh_peer_eval_loss", run="test")
    assert math.isfinite(live) and live > 0
    for peer in peers:
        assert wait_exit(peer, 180) == 0, peer.output()[-3000:]
    for peer in peers:
        evaluated = [int(e) for e in re.findall(r"evaluated epoch=(\d+) eval_loss=", peer.output())]
        assert evaluated and all(e % 2 == 0 for e in evaluated) and evaluated[-1] == 6, evaluated
        status = peer.status()
        assert status["eval_epoch"] == 6
        # the last evaluation saw the parameters the peer ended with (its exit checkpoint holds them)
        assert status["eval_loss"] == pytest.approx(eval_loss(peer.load_parameters()), rel=1e-5)
    first = float(re.search(r"evaluated epoch=2 eval_loss=(\S+)", peers[0].output()).group(1))
    assert peers[0].status()["eval_loss"] < first  # training lowered the held-out loss
