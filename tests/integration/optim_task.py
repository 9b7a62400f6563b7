"""The regression task with its own optimizer, parameter groups and scheduler (``Task.make_optimizer``,
``param_groups``, ``make_scheduler``), for tests/integration/test_schedule.py: SGD at lr 0.2 on the weight and lr 0
on the bias (a group the optimizer must leave untouched), halved every global epoch."""

from __future__ import annotations

import dataclasses

import torch

from mesh.tasks import regression
from mesh.tasks.base import Task

LR, DECAY = 0.2, 0.5


def task() -> Task:
    return dataclasses.replace(
        regression.regression_task(),
        name="regression-own-optimizer",
        param_groups=lambda model: [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.0}],
        make_optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: DECAY**epoch),
    )
