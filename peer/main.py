"""The peer process (``mesh peer``): a task's training loop on the library's session (mesh/session.py), the same
one a user's own loop runs on (``mesh.join``).

The session starts the DHT (and asks the coordinator), this module loads the task, and the loop is the one a user
would write: forward under autocast, backward, step, report. Leaving (SIGTERM, ``--max-epochs``, the coordinator)
runs the session's bounded leave.
"""

from __future__ import annotations

import logging

import torch

from mesh.config import PeerConfig, parse_task_args
from mesh.errors import ConfigError
from mesh.session import Peer
from mesh.tasks import load_task

logger = logging.getLogger(__name__)


def run(config: PeerConfig) -> int:
    # cheap checks first, so a typo costs no DHT start-up
    task_args = parse_task_args(config.task_arg)
    task = load_task(config.task, task_args) if config.task else None
    peer = Peer(config).start()
    with peer:
        aggregation = peer.record.aggregation if peer.record is not None else peer.config.aggregation
        if aggregation == "clipped" and config.data_plane == "hivemind":
            raise ConfigError(f"run {config.run!r} aggregates with clipping, which needs the data plane: drop --data-plane hivemind")
        if task is None:
            task = load_task(peer.task_spec, task_args)  # the run's (its record's, or the coordinator's)
        torch.manual_seed(peer.seed)  # every peer of the run starts from the same parameters
        model = peer.model(task.make_model(), evaluate=task.evaluate)
        opt = peer.optimizer(
            task.make_optimizer,
            scheduler=task.make_scheduler,
            param_groups=task.param_groups(model) if task.param_groups is not None else None,
            defaults=task.defaults,
        )
        record, steps = peer.record, 0
        for batch in peer.batches(task.make_batches(record.batch_size, peer.data_seed)):
            steps += 1
            if config.fault_nan_parameters_step is not None and steps == config.fault_nan_parameters_step:
                with torch.no_grad():
                    for param in model.parameters():
                        param.fill_(float("nan"))
            with peer.autocast:
                loss = task.loss(model, batch)
            if config.fault_nan_step is not None and steps == config.fault_nan_step:
                loss = loss * float("nan")
            (loss if config.fault_gradient_scale is None else loss * config.fault_gradient_scale).backward()
            if opt.step(record.batch_size):
                peer.report(loss=loss)
            opt.zero_grad()
    return peer.exit_code


if __name__ == "__main__":  # pragma: no cover - use `mesh peer`
    raise SystemExit("run `mesh peer --help`")
