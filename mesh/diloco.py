"""DiLoCo (arXiv 2311.08105): each peer takes many local optimizer steps, then the group averages how far the
parameters moved and every member applies that average with an outer optimizer.

The mesh builds it from the parts the gradient mode already has, with two changes of role:
- **hivemind's offloaded optimizer is the outer optimizer.** hivemind.Optimizer with ``offload_optimizer`` keeps its
  own copy of the parameters, steps it with the averaged "gradients" and copies it into the model. In DiLoCo mode
  that copy is the parameters at the last outer step (θ_outer), the optimizer is Nesterov SGD, and its momentum is
  the outer momentum. So the outer state is what hivemind already checkpoints (the optimizer's state), serves to a
  late joiner (``load_state_from_peers`` downloads the optimizer's parameters and state) and averages in a
  parameter round (with the momentum: ``average_opt_statistics``).
- **The averaged tensor is the pseudo-gradient** θ_outer − θ (:class:`PseudoGradientAverager`). The trainer steps
  the task's (inner) optimizer on the model every local step; the averager only counts the samples, and at the
  round loads θ_outer − θ instead of accumulated gradients, on the same data plane, standing groups, compression
  and epoch plan as gradient rounds.

An epoch is one outer step: ``inner_steps`` local steps per live peer, summed over the group (``MeshOptimizer``
sets the target from the live count). The epoch plan splits it by speed, so a faster peer takes more inner steps
and a slower one fewer and both arrive together, instead of the faster one idling.

A failed round costs that outer step's average: each member applies its own pseudo-gradient, then the group
averages parameters and outer momentum (the failed round asks for it). Nesterov SGD is linear in its gradient
and momentum, so members that started the step equal end it equal to one outer step on the mean of their
pseudo-gradients: the survivors agree again, and a member that was not there catches up by downloading the state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from mesh import dataplane
from mesh.averager import MeshGradientAverager


def outer_statistics(momentum: float) -> tuple[str, ...]:
    """The outer optimizer's state that members keep equal (averaged with the parameters in parameter rounds): its
    momentum buffer, which SGD without momentum does not have."""
    return ("momentum_buffer",) if momentum > 0 else ()


def outer_optimizer_factory(lr: float, momentum: float) -> Callable[[Any], torch.optim.Optimizer]:
    """The outer optimizer: SGD with Nesterov momentum (the DiLoCo paper's: lr 0.7, momentum 0.9). With momentum 0
    Nesterov is plain SGD, and lr 1 then makes the outer step the parameters' average."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


class PseudoGradientAverager(MeshGradientAverager):
    """Averages the pseudo-gradient θ_outer − θ of each member (weighted by the samples it trained on since the
    last outer step, like gradients), where θ_outer is the outer optimizer's parameters (set by the optimizer,
    ``outer_parameters``) and θ the model's."""

    outer_parameters: list[torch.Tensor] | None = None

    def accumulate_grads_(self, batch_size: int) -> None:
        # the inner optimizer has already used this step's gradient: only the samples count
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1
        self.batch_size = batch_size

    def checked_parameters(self) -> Iterable[torch.Tensor]:
        # members agree when their outer parameters do (the model's own move apart between outer steps)
        return self.outer_parameters if self.outer_parameters is not None else self.parameters

    def load_scale(self) -> float:
        return 1.0  # the pseudo-gradient is a difference, not a sum over steps

    def load_into_(self, buffers: list[torch.Tensor], scale: float) -> None:
        assert self.outer_parameters is not None, "the optimizer sets outer_parameters before the first round"
        dataplane.load_difference_(buffers, self.outer_parameters, list(self.parameters), scale)
