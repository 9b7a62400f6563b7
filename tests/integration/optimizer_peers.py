"""The run's real optimizers (``make_run_optimizer``) on hivemind DHT nodes on 127.0.0.1, for tests that drive them
from a script in a fresh Python (hivemind's objects in the test's process would leave sockets for pytest to report at
exit): ``from tests.integration.optimizer_peers import ...`` there, with the repository as the working directory."""

from __future__ import annotations

import hivemind
import torch

from mesh.admission import Admission
from mesh.config import PeerConfig
from mesh.optimizer import MeshOptimizer, make_run_optimizer
from mesh.records import RunRecord
from mesh.runs import new_record


def sgd_record(run: str, **settings) -> RunRecord:
    """A run of the regression task with SGD at lr 0.1 (and ``settings``, ``mesh peer``'s by their Python names)."""
    return new_record(run, "regression", "0" * 16, PeerConfig(run=run, task="regression", optimizer="sgd", lr=0.1, **settings))


def start_peer(record: RunRecord, initial_peers: list, model: torch.nn.Module | None = None) -> tuple[hivemind.DHT, MeshOptimizer]:
    """A DHT node joined through ``initial_peers`` (none: a new DHT) and the run's optimizer over ``model`` (by
    default a Linear(3, 1))."""
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    model = model if model is not None else torch.nn.Linear(3, 1)
    opt, _ = make_run_optimizer(
        dht, record, list(model.parameters()), own_optimizer=None, own_scheduler=None, admission=Admission(record.run_id)
    )
    return dht, opt


def set_parameters(opt: MeshOptimizer, value: float) -> None:
    """Every value of the optimizer's parameters (and the model's) to ``value``."""
    opt.set_optimized_parameters([torch.full_like(p, value) for p in opt.optimized_parameters])


def parameter_values(opt: MeshOptimizer) -> list[float]:
    return [v for p in opt.optimized_parameters for v in p.flatten().tolist()]
