"""DiLoCo (--averaging diloco, mesh/diloco.py) with real peers on 127.0.0.1 on the regression task.

Reference: a single process that runs the same algorithm on the union of the peers' data: two workers start from the
run's parameters, each takes ``inner_steps`` SGD steps on its own batches, their pseudo-gradients (outer parameters
minus the worker's) are averaged, and Nesterov SGD applies the mean to the outer parameters, which both workers
then start the next outer step from. The mesh differs only in the data drawn (each peer's stream is seeded by its
peer id) and in its first outer steps, which hivemind's estimate ends (a step or two more or fewer per peer); the
references cover both with five data seeds and inner steps from ``INNER - 2`` to ``INNER + 2``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mesh.diloco import outer_optimizer_factory
from tests.conftest import peer_args
from tests.integration.test_training import assert_same_parameters, eval_loss, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INNER, OUTER_STEPS, OUTER_LR, OUTER_MOMENTUM = 8, 4, 0.7, 0.5
DILOCO = ("--averaging", "diloco", "--inner-steps", str(INNER), "--outer-lr", str(OUTER_LR), "--outer-momentum", str(OUTER_MOMENTUM))
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
    extra = ("--max-epochs", str(OUTER_STEPS), "--min-peers", "2", "--min-step-time", "0.2", *DILOCO)
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
        assert status["outer_steps"] == len(steps[peers.index(peer)]) >= OUTER_STEPS - 1, status
        assert status["pseudo_gradient_norm"] > 0 and status["epoch"] == OUTER_STEPS, status
        assert status["data_plane_builds"] >= 1 and status["rounds"]["ok"] >= OUTER_STEPS - 1, status
    references = [diloco_reference(OUTER_STEPS, inner, (seed, seed + 100)) for seed in range(5) for inner in range(INNER - 2, INNER + 3)]
    start = diloco_reference(0, INNER, (0, 1))
    assert eval_loss(final) <= 1.5 * max(references), (eval_loss(final), max(references))
    assert eval_loss(final) < 0.1 * start, (eval_loss(final), start)
