"""Your own training loop on the mesh: ``mesh.join`` makes this script a peer of a run, and the loop stays yours.

    python -m mesh.examples.own_loop --join /ip4/HOST/tcp/31337/p2p/PEER_ID --run own-1
    python -m mesh.examples.own_loop --join ... --run own-1 --task-arg hidden=256    # every peer the same width

A second copy (on this machine or another) joins the first one's run; one started later takes the run's state
from the others. Every other setting of ``mesh peer`` comes from its ``MESH_*`` environment variable, as for the
CLI: ``MESH_TARGET_BATCH_SIZE=4096``, ``MESH_CHECKPOINT_DIR=ckpt``, ``MESH_RUN_SECRET=...``, ``MESH_DEVICE=cuda:1``.
Ctrl-C (or SIGTERM) leaves the run within ``--shutdown-timeout``, after a final checkpoint.

What it trains: a small MLP regressing a fixed random "teacher" network on a map-style dataset, with what a real
job has: a ``DataLoader`` over the dataset in this peer's own order (``mesh.data.PeerSampler``), AdamW with weight
decay on the weight matrices only, a linear warm-up then cosine schedule (by the run's epoch), gradient clipping
(of the averaged gradient), evaluation on held-out data. The same model, data and optimizer as a task
(:func:`task`), so that ``mesh export`` can build the model from the run's record and read this loop's checkpoints
(``--checkpoint-dir DIR``) or the live run's state (``--join ADDR --run RUN``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mesh
from mesh.config import parse_task_args
from mesh.data import PeerSampler
from mesh.errors import ConfigError, MeshError
from mesh.tasks import Task

FEATURES, OUTPUTS = 32, 8
TRAIN_SAMPLES, HELD_OUT_SAMPLES = 16384, 2048
DATA_SEED, TEACHER_SEED = 1234, 4321  # the dataset and the teacher are the task's, the same on every peer
BATCH_SIZE = 32
SPEC = "mesh.examples.own_loop:task"  # this script's name in the run's record (mesh export builds the model by it)


def make_model(hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, OUTPUTS),
    )


@torch.no_grad()
def dataset(samples: int, seed: int) -> TensorDataset:
    """``samples`` inputs and the teacher's outputs for them (the teacher is fixed: TEACHER_SEED)."""
    inputs = torch.randn(samples, FEATURES, generator=torch.Generator().manual_seed(seed))
    teacher = torch.Generator().manual_seed(TEACHER_SEED)
    w1, w2 = torch.randn(FEATURES, 64, generator=teacher), torch.randn(64, OUTPUTS, generator=teacher)
    return TensorDataset(inputs, torch.tanh(inputs @ w1 / math.sqrt(FEATURES)) @ w2 / math.sqrt(64))


def train_set() -> TensorDataset:
    return dataset(TRAIN_SAMPLES, DATA_SEED)


def held_out_set() -> TensorDataset:
    return dataset(HELD_OUT_SAMPLES, DATA_SEED + 1)  # other inputs: never trained on


def loader(batch_size: int, seed: int) -> DataLoader:
    """The training set in this peer's own order (``seed``: ``peer.data_seed``), a new one every pass."""
    data = train_set()
    return DataLoader(data, batch_size=batch_size, sampler=PeerSampler(data, seed), drop_last=True)


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


@torch.no_grad()
def evaluate(model: torch.nn.Module) -> float:
    device = next(model.parameters()).device
    inputs, targets = (tensor.to(device) for tensor in held_out_set().tensors)
    return float(F.mse_loss(model(inputs), targets))


def param_groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """Weight decay on the weight matrices, none on the biases (the usual split)."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(lr: float = 3e-3):
    return lambda groups: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def warmup_cosine(warmup: int = 5, total: int = 200):
    """A linear warm-up over ``warmup`` epochs, then cosine to 10 % of the lr at ``total``: by the *run's* epoch
    (the mesh steps the scheduler once per global epoch, so a late joiner has the lr everyone has)."""

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def task(hidden: int = 128, lr: float = 3e-3, weight_decay: float = 0.01, warmup: int = 5, total: int = 200) -> Task:
    """The same model, data, optimizer and schedule as a task, for ``mesh export`` and ``mesh peer --task``."""

    return Task(
        name="own-loop-mlp",
        make_model=lambda: make_model(hidden),
        make_batches=loader,
        loss=loss_fn,
        evaluate=evaluate,
        make_optimizer=make_optimizer(lr),
        make_scheduler=warmup_cosine(warmup, total),
        param_groups=lambda model: param_groups(model, weight_decay),
        description=f"MLP ({hidden} wide) regressing a fixed teacher network; AdamW, warm-up then cosine",
        defaults={"batch_size": BATCH_SIZE, "target_batch_size": 1024},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.examples.own_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--join", action="append", default=[], metavar="ADDR", help="a peer's or the bootstrap's multiaddr (repeatable)")
    parser.add_argument("--run", default="own-loop", help="the run to join, or to create when nobody trains it")
    parser.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE", help="hidden, lr, weight_decay, warmup, total")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_task_args(tuple(args.task_arg))
        try:
            inspect.signature(task).bind(**settings)
        except TypeError as err:
            raise ConfigError(f"--task-arg: {err} (it takes hidden, lr, weight_decay, warmup, total)") from None
        return train(args.run, args.join, **settings)
    except MeshError as err:  # a mistake of the user's: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def train(
    run: str, join: list[str], hidden: int = 128, lr: float = 3e-3, weight_decay: float = 0.01, warmup: int = 5, total: int = 200
) -> int:
    # the loop a user writes: everything the mesh needs is in the calls on `peer`
    with mesh.join(run=run, join=join, task=SPEC, batch_size=BATCH_SIZE) as peer:
        model = peer.model(make_model(hidden), evaluate=evaluate)  # built after join: the run's seed, every peer alike
        opt = peer.optimizer(
            make_optimizer(lr),
            scheduler=warmup_cosine(warmup, total),
            clip_grad_norm=1.0,
            param_groups=param_groups(model, weight_decay),
            defaults={"target_batch_size": 1024},  # for a run this peer creates without MESH_TARGET_BATCH_SIZE
        )
        # until Ctrl-C / SIGTERM / max_epochs; resumed where a checkpoint left it
        for batch in peer.batches(loader(BATCH_SIZE, peer.data_seed)):
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            peer.report(loss=loss)
    return peer.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
