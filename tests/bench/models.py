"""A benchmark task with a real model's gradient size: a 25M-parameter MLP (``--task tests.bench.models:mlp25m``).

Three layers, 1024 -> 4096 -> 4096 -> 1024 (25.2M parameters, 100 MB of float32 gradients), regressing a fixed
random linear teacher. What matters for the benchmark is the ratio of compute to gradient bytes, which is that of
a mid-sized model: one step of batch 16 on one CPU thread takes tens of milliseconds, an epoch's all-reduce moves
100 MB.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from mesh.tasks.base import Task

WIDTH, HIDDEN = 1024, 4096


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, WIDTH),
    )


def make_batches(batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    teacher = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(7)) / WIDTH**0.5
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, WIDTH, generator=gen)
        yield x, x @ teacher


def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def mlp25m() -> Task:
    return Task(
        name="mlp25m",
        make_model=make_model,
        make_batches=make_batches,
        loss=loss,
        description="25M-parameter MLP regressing a linear teacher (benchmark)",
        defaults={"optimizer": "adamw", "lr": 1e-4, "batch_size": 16, "target_batch_size": 512},
    )
