"""The ``regression`` task: a student learns a fixed linear teacher, so the optimum (MSE 0) is known exactly.

Tests and benchmarks use it to check that the mesh actually optimises: ``reference_loss_curve`` gives the loss a
single process reaches with plain SGD, which a mesh run of the same total batch should match.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from mesh.tasks.base import Task

IN_DIM = 16
OUT_DIM = 4
TEACHER_SEED = 20240601
DEFAULT_LR = 0.2
"""With x ~ N(0, 1) the MSE's Hessian is 0.5 * I, so lr 0.2 shrinks the weight error ~10% a step: the loss falls
~50x over 20 steps of batch 64, a curve that is visible rather than done in 3 steps. Measured: batch-16 SGD only
diverges near lr 2, so 0.2 leaves a wide margin for a mesh's stale or averaged gradients."""

Batch = tuple[torch.Tensor, torch.Tensor]


def teacher_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's weight and bias, from a private generator so the global RNG neither affects nor sees them."""
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    weight = torch.randn(OUT_DIM, IN_DIM, generator=gen) / IN_DIM**0.5  # unit-variance outputs
    bias = 0.5 * torch.randn(OUT_DIM, generator=gen)
    return weight, bias


_TEACHER_WEIGHT, _TEACHER_BIAS = teacher_parameters()


def teacher(x: torch.Tensor) -> torch.Tensor:
    """The target function; the student (the same linear map) can match it exactly."""
    with torch.no_grad():
        return F.linear(x, _TEACHER_WEIGHT, _TEACHER_BIAS)


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(IN_DIM, OUT_DIM)


def make_batches(batch_size: int, seed: int) -> Iterator[Batch]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, IN_DIM, generator=gen)
        yield x, teacher(x)


def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


HELD_OUT_SEED = 12345  # the held-out batch's stream (peers' seeds come from their ids: another stream)


def evaluate(model: torch.nn.Module) -> float:
    """MSE on 4096 held-out inputs (the same on every peer and every call)."""
    return float(loss(model, next(make_batches(4096, HELD_OUT_SEED))))


def regression_task() -> Task:
    return Task(
        name="regression",
        make_model=make_model,
        make_batches=make_batches,
        loss=loss,
        evaluate=evaluate,
        description=f"linear student learns a fixed linear teacher ({IN_DIM}->{OUT_DIM}, no noise, optimum MSE 0)",
        defaults={"optimizer": "sgd", "lr": DEFAULT_LR, "batch_size": 16, "target_batch_size": 64},
    )


def reference_loss_curve(steps: int, batch_size: int, lr: float, seed: int, model_seed: int) -> list[float]:
    """Per-step loss of single-process SGD: what a mesh run with the same seeds and total batch should approach.

    The global RNG state is restored afterwards, so calling this does not change what the caller's code draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = make_batches(batch_size, seed)
    curve: list[float] = []
    for _ in range(steps):
        optimizer.zero_grad()
        step_loss = loss(model, next(batches))
        step_loss.backward()
        optimizer.step()
        curve.append(step_loss.item())
    return curve
