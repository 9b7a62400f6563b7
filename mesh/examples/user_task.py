"""An example user task: a linear classifier on synthetic, linearly separable data.

It ships inside the package, so it works from anywhere; your own module works the same way from your project folder::

    mesh peer --task mesh.examples.user_task:make_task

A task is a ``mesh.tasks.Task`` returned by a function; its keyword arguments come from ``--task-arg KEY=VALUE``
(or a ``[task]`` table in the config file), checked against its signature::

    mesh peer --task mesh.examples.user_task:make_task --task-arg hidden=32

It needs:

- ``make_model()``: a fresh ``torch.nn.Module``; the trainer calls it under ``torch.manual_seed(run_seed)`` so every
  peer starts from the same weights, so draw initial weights from the global RNG (as ``torch.nn`` layers do).
- ``make_batches(batch_size, seed)``: batches (a tensor, or a tuple/list/dict of tensors), as an endless iterator
  or an iterable such as a ``DataLoader`` (iterated again every pass); each peer passes its own seed, so use a
  ``torch.Generator`` seeded with it, not the global RNG.
- ``loss(model, batch)``: a scalar tensor; the trainer calls ``.backward()`` on it.
- ``defaults`` (optional): ``optimizer``, ``lr``, ``batch_size``, ``target_batch_size`` used when the run is
  created without them.

Every peer of a run must load the same task (the run's config records its name).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from mesh.tasks import Task

N_FEATURES = 8
N_CLASSES = 3
_BOUNDARY_SEED = 7  # the true class boundaries are a fixed part of the task, the same on every peer


def _true_weights() -> torch.Tensor:
    return torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(_BOUNDARY_SEED))


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(N_FEATURES, N_CLASSES)


def make_batches(batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    weights = _true_weights()
    while True:
        x = torch.randn(batch_size, N_FEATURES, generator=gen)
        yield x, (x @ weights.T).argmax(dim=1)


def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_task(hidden: int = 0) -> Task:
    """``hidden``: the width of one hidden ReLU layer (0: the linear classifier). A different width is another
    model (another fingerprint), so every peer of a run passes the same one."""
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")

    def model() -> torch.nn.Module:
        if not hidden:
            return make_model()
        return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, N_CLASSES))

    shape = f"one hidden layer of {hidden}" if hidden else "linear"
    return Task(
        name="example-linear-classifier",
        make_model=model,
        make_batches=make_batches,
        loss=loss,
        description=f"{shape} classifier, {N_FEATURES} features -> {N_CLASSES} classes, synthetic separable data",
        defaults={"optimizer": "sgd", "lr": 0.5, "batch_size": 32, "target_batch_size": 128},
    )
