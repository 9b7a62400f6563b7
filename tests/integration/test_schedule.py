"""The run's learning-rate schedule and gradient clipping on real peers (mesh/schedule.py), against closed forms:
every peer, a late joiner included, steps epoch e with ``lr · lr_factor(e)``; a spiked averaged gradient is applied
with its norm at the bound (one SGD step moves the parameters by exactly ``lr · clip``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mesh.schedule import lr_factor
from mesh.tasks import load_task
from tests.conftest import peer_args
from tests.integration.test_training import assert_same_parameters, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LR, WARMUP, TOTAL = 0.2, 3, 14
PROGRESS = re.compile(r"progress epoch=(\d+) loss=\S+ lr=(\S+)")


def logged_lrs(output: str) -> dict[int, float]:
    return {int(epoch): float(lr) for epoch, lr in PROGRESS.findall(output) if lr != "nan"}


def test_a_late_joiner_has_the_runs_learning_rate_at_every_epoch_of_warmup_then_cosine(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    schedule = ("--lr-schedule", "cosine", "--warmup-epochs", str(WARMUP), "--total-epochs", str(TOTAL))
    common = ("--max-epochs", str(TOTAL), "--log-every", "0.5", *schedule)
    first = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *common, "--min-peers", "2")) for n in ("a", "b")]
    first[0].wait_epoch(4, timeout=180)
    late = mesh_procs("c", *peer_args(bootstrap, "c", tmp_path, "--max-epochs", str(TOTAL), "--log-every", "0.5", task=None))
    for peer in (*first, late):
        assert wait_exit(peer, 240) == 0, peer.output()[-3000:]
    assert re.search(r"joined run run=test", late.output()), late.output()[-3000:]
    joined_at = min(logged_lrs(late.output()))
    assert joined_at >= 4, logged_lrs(late.output())  # it really came late: it never saw the warm-up
    for peer in (*first, late):
        lrs = logged_lrs(peer.output())
        assert len([e for e in lrs if e >= joined_at]) >= 3, (peer.name, lrs)
        for epoch, lr in lrs.items():  # the lr it steps epoch `epoch` with, by the run's schedule
            assert lr == pytest.approx(LR * lr_factor(epoch, "cosine", WARMUP, TOTAL), rel=1e-4), (peer.name, epoch, lrs)
        assert peer.status()["lr"] == pytest.approx(LR * lr_factor(TOTAL, "cosine", WARMUP, TOTAL), abs=1e-9)
    assert_same_parameters(*first, late)


def test_a_spiked_gradient_is_applied_with_its_averaged_norm_at_the_bound(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    clip = 1.0
    common = ("--max-epochs", "1", "--min-peers", "2", "--clip-grad-norm", str(clip), "--optimizer", "sgd", "--lr", str(LR))
    peers = [
        mesh_procs(name, *peer_args(bootstrap, name, tmp_path, *common, *extra))
        for name, extra in (("a", ()), ("spiky", ("--fault-gradient-scale", "1e4")))
    ]
    for peer in peers:
        assert wait_exit(peer, 180) == 0, peer.output()[-3000:]
    final = peers[0].load_parameters()
    torch.manual_seed(0)  # the run's seed: the parameters every peer started from
    start = load_task("regression").make_model().state_dict()
    moved = torch.cat([(final[name] - start[name]).reshape(-1) for name in start]).norm().item()
    assert peers[0].status()["rounds"]["ok"] == 1, peers[0].status()  # the spike was in the average
    assert moved == pytest.approx(LR * clip, rel=1e-4)  # one step of lr x the gradient clipped to norm 1
    assert_same_parameters(*peers)


def test_a_tasks_own_optimizer_groups_and_scheduler_are_what_the_peers_step_with(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """tests/integration/optim_task.py: the weight's group steps at 0.2 · 0.5^epoch, the bias's group at lr 0."""
    from tests.integration.optim_task import DECAY
    from tests.integration.optim_task import LR as TASK_LR

    common = ("--max-epochs", "4", "--min-peers", "2", "--log-every", "0.5")
    spec = "tests.integration.optim_task:task"
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *common, task=spec)) for n in ("a", "b")]
    for peer in peers:
        assert wait_exit(peer, 180) == 0, peer.output()[-3000:]
    assert any("optimizer=task" in peer.output() for peer in peers), [p.output()[-2000:] for p in peers]
    for peer in peers:
        lrs = logged_lrs(peer.output())
        assert lrs and all(lr == pytest.approx(TASK_LR * DECAY**epoch, rel=1e-6) for epoch, lr in lrs.items()), lrs
    final = assert_same_parameters(*peers)
    torch.manual_seed(0)
    start = load_task("regression").make_model().state_dict()
    assert torch.equal(final["bias"], start["bias"])  # its group's lr is 0: never moved
    assert not torch.equal(final["weight"], start["weight"])
