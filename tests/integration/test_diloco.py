"""DiLoCo (--averaging diloco, mesh/diloco.py) with real peers on 127.0.0.1 on the regression task.

Reference: a single process that runs the same algorithm on the union of the peers' data: two workers start from the
run's parameters, each takes ``inner_steps`` SGD steps on its own batches, their pseudo-gradients (outer parameters
minus the worker's) are averaged, and Nesterov SGD applies the mean to the outer parameters, which both workers
then start the next outer step from. The mesh differs only in the data drawn (each peer's stream is seeded by its
peer id) and in its first outer steps, which hivemind's estimate ends (a step or two more or fewer per peer); the
references cover both with five data seeds and inner steps from ``INNER - 2`` to ``INNER + 2``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from mesh.diloco import outer_optimizer_factory
from tests.conftest import peer_args
from tests.integration.test_training import assert_same_parameters, eval_loss, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INNER, OUTER_STEPS, OUTER_LR, OUTER_MOMENTUM = 8, 4, 0.7, 0.5
DILOCO = ("--averaging", "diloco", "--inner-steps", str(INNER), "--outer-lr", str(OUTER_LR), "--outer-momentum", str(OUTER_MOMENTUM))
SECRET = "a-diloco-run-secret"
OUTER_LINE = re.compile(r"outer step epoch=(\d+) inner_steps=(\d+) pseudo_gradient_norm=\S+ group=(\d+) parameters_digest=(\S+)")


def diloco_reference(outer_steps: int, inner_steps: int, seeds: tuple[int, ...]) -> float:
    """The held-out loss of single-process DiLoCo with one worker per seed (see the module's docstring)."""
    from mesh.tasks import load_task

    task = load_task("regression")
    torch.manual_seed(0)  # the run's seed: the mesh's peers start from these parameters too
    start = task.make_model()
    outer = [p.detach().clone() for p in start.parameters()]
    outer_opt = outer_optimizer_factory(OUTER_LR, OUTER_MOMENTUM)(outer)
    workers = []
    for seed in seeds:
        model = task.make_model()
        model.load_state_dict(start.state_dict())
        workers.append((model, torch.optim.SGD(model.parameters(), lr=task.defaults["lr"]), task.make_batches(16, seed)))
    for _ in range(outer_steps):
        pseudo = [torch.zeros_like(p) for p in outer]
        for model, opt, batches in workers:
            for _ in range(inner_steps):
                opt.zero_grad()
                task.loss(model, next(batches)).backward()
                opt.step()
            for mean, before, now in zip(pseudo, outer, model.parameters()):
                mean += (before - now.detach()) / len(workers)
        for param, grad in zip(outer, pseudo):
            param.grad = grad
        outer_opt.step()
        with torch.no_grad():
            for model, _, _ in workers:
                for param, value in zip(model.parameters(), outer):
                    param.copy_(value)
    return eval_loss(dict(zip(("weight", "bias"), outer)))


def outer_steps(output: str) -> dict[int, tuple[int, int, str]]:
    """epoch -> (inner steps, group size, digest of the outer parameters) from a peer's log."""
    return {int(e): (int(inner), int(group), digest) for e, inner, group, digest in OUTER_LINE.findall(output)}


def test_two_diloco_peers_agree_after_every_outer_step_and_learn_like_the_reference(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """A protected run (--run-secret): pseudo-gradients take the admitted path (tickets, sealed rendezvous)."""
    extra = ("--max-epochs", str(OUTER_STEPS), "--min-peers", "2", "--min-step-time", "0.2", "--run-secret", SECRET, *DILOCO)
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *extra)) for n in ("a", "b")]
    for peer in peers:
        assert wait_exit(peer, 180) == 0, peer.output()[-3000:]
    final = assert_same_parameters(*peers)
    steps = [outer_steps(peer.output()) for peer in peers]
    both = sorted(set(steps[0]) & set(steps[1]))
    averaged = [epoch for epoch in both if steps[0][epoch][1] == steps[1][epoch][1] == 2]
    assert len(averaged) >= OUTER_STEPS - 1, steps  # the first may end before both are in a group
    for epoch in averaged:  # after every outer step both hold the same outer parameters, bit for bit
        assert steps[0][epoch][2] == steps[1][epoch][2], (epoch, steps)
    # the outer epoch is INNER local steps per peer: the epoch plan splits it exactly after a settled round (the
    # round that ends epoch 1 is the peers' first, which asks for a parameter round: the plan begins at epoch 3)
    planned = [epoch for epoch in averaged if epoch >= 3 and epoch - 1 in averaged]
    assert all(steps[0][e][0] + steps[1][e][0] == 2 * INNER for e in planned), steps
    for peer in peers:
        status = peer.status()
        assert "protected=True" in peer.output() and sum(status["refused"].values()) == 0, status
        assert status["outer_steps"] == len(steps[peers.index(peer)]) >= OUTER_STEPS - 1, status
        assert status["pseudo_gradient_norm"] > 0 and status["epoch"] == OUTER_STEPS, status
        assert status["data_plane_builds"] >= 1 and status["rounds"]["ok"] >= OUTER_STEPS - 1, status
        # counted on the wire (the kernel's TCP counters): at least the other member's half of the 68 float32
        # pseudo-gradient and its half of the mean back, per round
        assert status["tcp_sent_bytes"] >= 68 * 4 * status["rounds"]["ok"] and status["tcp_received_bytes"] > 0, status
    references = [diloco_reference(OUTER_STEPS, inner, (seed, seed + 100)) for seed in range(5) for inner in range(INNER - 2, INNER + 3)]
    start = diloco_reference(0, INNER, (0, 1))
    assert eval_loss(final) <= 1.5 * max(references), (eval_loss(final), max(references))
    assert eval_loss(final) < 0.1 * start, (eval_loss(final), start)


def test_survivors_of_a_killed_peer_agree_and_a_late_joiner_takes_the_outer_state(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """SIGKILL one of three DiLoCo peers (pseudo-gradients sent as fp16): the standing group's next round fails at
    once (the dead member's connections close), each survivor applies its own pseudo-gradient, and the parameter
    round that follows averages the outer parameters and momentum, so the survivors agree and go on. Then a fourth
    peer joins late: it downloads the outer state and ends on the others' parameters."""
    total = 26  # epochs of ~1.6 s: the late joiner, started at the kill, is in after 5-15 s of start-up (more under load)
    # fp16 on the wire: compression applies to the pseudo-gradient, and members still agree bit for bit
    extra = ("--max-epochs", str(total), "--min-step-time", "0.2", "--compression", "fp16", *DILOCO)
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *extra, "--min-peers", "3")) for n in ("a", "b", "c")]
    peers[2].wait_epoch(3, timeout=180)
    os.killpg(peers[2].proc.pid, signal.SIGKILL)
    survivors = peers[:2]
    late = mesh_procs("d", *peer_args(bootstrap, "d", tmp_path, *extra))
    for peer in [*survivors, late]:
        assert wait_exit(peer, 240) == 0, peer.output()[-3000:]
        assert peer.status()["epoch"] == total, peer.status()
    assert_same_parameters(*survivors, late)
    for peer in survivors:
        status = peer.status()
        assert status["rounds"]["failed"] <= 2, status  # the kill cost a round or two, not the run
        # every epoch came with an outer step, but for those a member caught up on by downloading the state
        assert status["outer_steps"] >= total // 2, status
    # the late joiner took the outer parameters and momentum from the others, then stepped with them
    status = late.status()
    assert status["state_downloads"] >= 1 and status["outer_steps"] >= 1 and status["rounds"]["ok"] >= 1, status
    steps = [outer_steps(peer.output()) for peer in (*survivors, late)]
    shared = [e for e in set(steps[0]) & set(steps[1]) & set(steps[2]) if steps[2][e][1] == 3]
    assert shared, steps  # at least one outer step of all three, in one group
    for epoch in shared:
        digests = [step[epoch][2] for step in steps]
        # a string, which pytest prints whole: the steps of all three, and the warnings that may say what parted them
        logs = {name: peer.output().splitlines() for name, peer in zip("abd", (*survivors, late))}
        warnings = [f"{name}: {line}" for name, lines in logs.items() for line in lines if " WARN " in line]
        assert len(set(digests)) == 1, f"epoch {epoch}: {digests}\nsteps: {steps}\n" + "\n".join(warnings)


def test_diloco_checkpoint_resume_restores_the_inner_and_outer_state(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    # Adam as the inner optimizer: it has state (moments, step counts) to lose. The outer SGD without momentum
    # (it has no state then: a peer with --outer-momentum 0 used to fail at start on the missing momentum buffer)
    extra = ("--min-step-time", "0.05", "--optimizer", "adam", "--lr", "0.05", *DILOCO, "--outer-momentum", "0")
    first = mesh_procs("a", *peer_args(bootstrap, "a", tmp_path, "--max-epochs", "2", *extra))
    assert wait_exit(first, 120) == 0, first.output()[-3000:]
    saved = torch.load(first.checkpoint_dir / "checkpoint.pt", weights_only=False)
    first_steps = first.status()["local_steps"]
    assert saved["inner_optimizer"]["state"][0]["step"] == first_steps
    # it left right after an outer step: the model is at the outer parameters
    assert_close(saved["outer_parameters"], list(saved["model"].values()))
    (tmp_path / "a.log").rename(tmp_path / "a-first.log")
    again = mesh_procs("a", *peer_args(bootstrap, "a", tmp_path, "--max-epochs", "4", *extra))
    assert wait_exit(again, 120) == 0, again.output()[-3000:]
    assert "resumed from checkpoint" in again.output()
    resumed = torch.load(again.checkpoint_dir / "checkpoint.pt", weights_only=False)
    # the inner optimizer went on counting from the saved state (a fresh one would count this run's steps only)
    assert resumed["inner_optimizer"]["state"][0]["step"] == first_steps + again.status()["local_steps"]
    assert again.status()["outer_steps"] == 2  # epochs 3 and 4, not 1 to 4
    # from the saved outer parameters, two more outer steps lower the loss (from the initial ones, it rose)
    assert eval_loss(resumed["model"]) < eval_loss(saved["model"]), (eval_loss(resumed["model"]), eval_loss(saved["model"]))
