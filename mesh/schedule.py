"""The learning rate by global epoch, and clipping before each optimizer step: what a run's record asks of the
optimizer hivemind.Optimizer steps (mesh/optimizer.py builds it from these).

hivemind steps a scheduler given as ``scheduler=`` until its step count passes the *global* epoch, also after a
state download (``TrainingStateAverager._update_scheduler``), so every peer, a late joiner included, has the
learning rate of the epoch the run is at. Clipping is a pre-step hook of that optimizer: hivemind has loaded the
group's averaged gradient into the parameters' ``.grad`` by then, so it is the averaged gradient that is clipped.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def lr_factor(epoch: int, schedule: str, warmup: int, total: int | None) -> float:
    """The fraction of the run's lr at global ``epoch``: a linear warm-up over ``warmup`` epochs (epoch 0 at
    1/warmup of it, so that no epoch steps with 0), then constant, or linear or cosine down to 0 at ``total``."""
    if warmup and epoch < warmup:
        return (epoch + 1) / warmup
    if schedule == "constant":
        return 1.0
    assert total is not None and total > warmup
    progress = min(1.0, (epoch - warmup) / (total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(schedule: str, warmup: int, total: int | None) -> Callable[[torch.optim.Optimizer], Any] | None:
    """``hivemind.Optimizer(scheduler=)``: a LambdaLR of :func:`lr_factor`; None for a constant lr without warm-up."""
    if schedule == "constant" and not warmup:
        return None
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, schedule, warmup, total))


def clip_before_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.optim.Optimizer:
    """Clip the gradients of ``optimizer``'s parameters to ``max_norm`` (their joint norm) before every step."""

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    optimizer.register_step_pre_hook(clip)
    return optimizer
