"""The task interface: what a peer trains. Built-in tasks and user tasks (``module:function``) return a Task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

Batch = Any  # a tensor, or a tuple/list/dict of tensors; moved to the device by the trainer


@dataclass(frozen=True)
class Task:
    """Everything a peer needs to train one model.

    The trainer calls ``make_model()`` under ``torch.manual_seed(run_seed)``, so every peer of a run starts from
    the same parameters; ``make_batches(batch_size, seed)`` with a per-peer seed, so peers see different data.
    """

    name: str
    """Short name, recorded in the run's config."""
    make_model: Callable[[], torch.nn.Module]
    """Builds a freshly initialised model (called under a fixed seed)."""
    make_batches: Callable[[int, int], Iterator[Batch] | Iterable[Batch]]
    """``(batch_size, seed) ->`` batches: an endless iterator, or an iterable (a ``DataLoader``, a list) that the
    trainer iterates again every pass, calling ``set_epoch`` on it or its sampler first (mesh/data.py)."""
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    """``(model, batch) -> scalar loss`` (the trainer calls ``.backward()`` on it)."""
    description: str = ""
    """One line shown by ``mesh up`` and in logs."""
    make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    """Optional ``params -> optimizer`` (the parameters, or the groups of ``param_groups``): the task's own
    optimizer instead of the built-in ``--optimizer``/``--lr``/``--weight-decay`` (the run records
    ``optimizer=task``). ``--clip-grad-norm`` still applies to it."""
    param_groups: Callable[[torch.nn.Module], list[dict[str, Any]]] | None = None
    """Optional ``model -> parameter groups`` for ``make_optimizer`` (e.g. no weight decay on biases and norms);
    every parameter of the model in exactly one group."""
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    """Optional ``optimizer -> LR scheduler``, stepped once per *global* epoch (hivemind's ``scheduler=``), so a late
    joiner has the run's learning rate; instead of ``--lr-schedule``."""
    evaluate: Callable[[torch.nn.Module], float] | None = None
    """Optional ``model -> held-out loss`` (data the peers never train on), called every ``--eval-every`` epochs
    under ``torch.no_grad()`` with the model in ``eval()`` mode; reported as ``mesh_peer_eval_loss``."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Suggested hyperparameters (``lr``, ``optimizer``, ``batch_size``, ``target_batch_size``) used when a run is
    created with this task and the user gave none."""
