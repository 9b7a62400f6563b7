"""A task whose ``make_batches`` returns a ``DataLoader`` with two worker processes over a fixed dataset (the
regression task's teacher on 64 fixed inputs), for tests/integration/test_data.py.

Its sampler has ``set_epoch`` and yields ``(pass, index)`` keys in an order fixed by the pass alone (not by the
peer's seed), so a restarted peer that started its data over would replay exactly what it had trained on. Every
sample carries its key; the loss appends the keys of each batch it trains on to ``$MESH_TEST_DATA_LOG``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from mesh.tasks import regression
from mesh.tasks.base import Task

SAMPLES = 64
_INPUTS = torch.randn(SAMPLES, regression.IN_DIM, generator=torch.Generator().manual_seed(5))


def order(passes: int) -> list[tuple[int, int]]:
    """Every key the sampler gives in its first ``passes`` passes, in order."""
    return [key for epoch in range(passes) for key in PassSampler(epoch)]


class PassSampler(Sampler):
    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        permutation = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(1000 + self.epoch))
        return iter([(self.epoch, int(i)) for i in permutation])

    def __len__(self) -> int:
        return SAMPLES


class Keyed(Dataset):
    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        x = _INPUTS[index]
        return x, regression.teacher(x.unsqueeze(0))[0], torch.tensor([epoch, index])

    def __len__(self) -> int:
        return SAMPLES


def make_batches(batch_size: int, seed: int) -> DataLoader:
    return DataLoader(Keyed(), batch_size=batch_size, sampler=PassSampler(), num_workers=2)


def loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y, keys = batch
    with open(os.environ["MESH_TEST_DATA_LOG"], "a") as log:
        log.writelines(f"{epoch} {index}\n" for epoch, index in keys.tolist())
    return F.mse_loss(model(x), y)


def task() -> Task:
    return Task(
        name="loader",
        make_model=regression.make_model,
        make_batches=make_batches,
        loss=loss,
        description="the regression teacher on 64 fixed inputs, through a DataLoader with 2 workers",
        defaults={"optimizer": "sgd", "lr": regression.DEFAULT_LR, "batch_size": 16, "target_batch_size": 64},
    )
