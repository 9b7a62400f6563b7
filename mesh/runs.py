"""Joining a run: read its record from the DHT, or create it when this peer brings a task."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch
from hivemind import DHT

from mesh import metrics
from mesh.admission import Admission
from mesh.config import RunDefaults
from mesh.dht import routing_table_size
from mesh.errors import ConfigError, RunError
from mesh.records import (
    PRESENCE_TTL,
    RECORD_TTL,
    PeerPresence,
    RunRecord,
    announce_peer,
    fetch_run,
    fingerprint,
    make_record,
    publish_run,
)
from mesh.tasks.base import Task

logger = logging.getLogger(__name__)


def model_fingerprint(task: Task, seed: int) -> str:
    torch.manual_seed(seed)
    return fingerprint(task.make_model())


TASK_DEFAULTED = ("batch_size", "target_batch_size", "optimizer", "lr")


def resolve_hyperparameters(suggested: dict, given: dict) -> dict:
    """``batch_size``, ``target_batch_size``, ``optimizer`` and ``lr``: the given ones (None: unset), then the task's
    ``suggested`` ones (``Task.defaults``), then the mesh's; the epoch is never smaller than one local batch. The one
    rule for every path that creates a run (``mesh peer --task``, ``mesh.join``, the coordinator's API)."""
    suggested = {"batch_size": 16, "target_batch_size": 256, "optimizer": "adamw", "lr": 1e-3, **suggested}
    hyper = {name: suggested[name] if given.get(name) is None else given[name] for name in TASK_DEFAULTED}
    hyper["target_batch_size"] = max(hyper["target_batch_size"], hyper["batch_size"])
    return hyper


def _check_own_optimizer(name: str, defaults: RunDefaults, own_optimizer: bool, own_scheduler: bool) -> None:
    """One line when the settings set what the peer's own optimizer or scheduler decides."""
    if own_optimizer and (defaults.optimizer is not None or defaults.weight_decay):
        raise ConfigError(f"{name} makes its own optimizer: drop --optimizer and --weight-decay (its factory sets them)")
    if own_scheduler and (defaults.lr_schedule != "constant" or defaults.warmup_epochs):
        raise ConfigError(f"{name} makes its own lr scheduler: drop --lr-schedule and --warmup-epochs")


def new_record(
    run_id: str,
    task_spec: str,
    model_fingerprint: str,
    defaults: RunDefaults,
    *,
    suggested: dict | None = None,
    own_optimizer: bool = False,
    own_scheduler: bool = False,
) -> RunRecord:
    """The record of a new run: the settings first, then the task's ``suggested`` hyperparameters. ``own_optimizer``:
    the peers step their own optimizer factory (recorded as ``optimizer=task``; its lr is the factory's)."""
    _check_own_optimizer(f"task {task_spec!r}", defaults, own_optimizer, own_scheduler)
    hyper = resolve_hyperparameters(suggested or {}, {name: getattr(defaults, name) for name in TASK_DEFAULTED})
    if own_optimizer:
        hyper["optimizer"] = "task"
    return make_record(
        run_id,
        task_spec,
        model_fingerprint,
        weight_decay=defaults.weight_decay,
        lr_schedule=defaults.lr_schedule,
        warmup_epochs=defaults.warmup_epochs,
        total_epochs=defaults.total_epochs,
        clip_grad_norm=defaults.clip_grad_norm,
        averaging=defaults.averaging,
        compression=defaults.compression,
        aggregation=defaults.aggregation,
        matchmaking_time=defaults.matchmaking_time,
        averaging_timeout=defaults.averaging_timeout,
        average_state_every=defaults.average_state_every,
        inner_steps=defaults.inner_steps,
        outer_lr=defaults.outer_lr,
        outer_momentum=defaults.outer_momentum,
        seed=defaults.seed,
        **hyper,
    )


def create_record(run_id: str, task_spec: str, task: Task, defaults: RunDefaults) -> RunRecord:
    """The record a run of ``task`` gets when it is created with ``defaults`` (``mesh peer --task``, the API)."""
    return new_record(
        run_id,
        task_spec,
        model_fingerprint(task, defaults.seed),
        defaults,
        suggested=task.defaults,
        own_optimizer=task.make_optimizer is not None,
        own_scheduler=task.make_scheduler is not None,
    )


def warn_if_open(admission: Admission) -> None:
    if not admission.protected:
        logger.warning(
            "run %s is open: any process that can reach the mesh can join it and average with it; "
            "protect it with --run-secret (docs/security.md)",
            admission.run_id,
        )


def publish_new(dht: DHT, record: RunRecord, admission: Admission) -> RunRecord:
    """Publish a run this peer creates; the copy the DHT settled on (a peer that created it at the same moment
    may have won), else ``record``."""
    if not publish_run(dht, record, admission=admission):
        logger.warning("no DHT node accepted the run record yet run=%s; will retry", record.run_id)
    logger.info(
        "created run run=%s task=%s fingerprint=%s protected=%s", record.run_id, record.task, record.fingerprint, admission.protected
    )
    return fetch_run(dht, record.run_id, attempts=1, admission=admission) or record


def check_joined(record: RunRecord, task_spec: str | None, model_fingerprint: str | None) -> None:
    """Refuse (RunError) to train ``record``'s run with another task, or a model of other shapes."""
    run_id = record.run_id
    if task_spec is not None and task_spec != record.task:
        raise RunError(f"run {run_id!r} trains task {record.task!r}, not {task_spec!r}; drop --task or pick another run")
    if model_fingerprint is not None and model_fingerprint != record.fingerprint:
        raise RunError(
            f"this peer's model (task {task_spec or record.task!r}) has parameter fingerprint {model_fingerprint}, "
            f"but run {run_id!r} expects {record.fingerprint}: the model's shapes differ; update the code to the run's version"
        )


def log_joined(record: RunRecord, admission: Admission) -> None:
    logger.info(
        "joined run run=%s task=%s epoch_size=%d optimizer=%s lr=%s protected=%s",
        record.run_id,
        record.task,
        record.target_batch_size,
        record.optimizer,
        # a run that steps its peers' own optimizer takes the lr from their factory, not from the record
        "own" if record.optimizer == "task" else f"{record.lr:g}",
        admission.protected,
    )


def starting_presence(run_id: str, device: str) -> PeerPresence:
    """A peer's presence before its first epoch."""
    return PeerPresence(run_id=run_id, epoch=0, samples_per_second=0.0, device=device, time=time.time())


class RecordKeeper(threading.Thread):
    """While this peer lives: announces it (every few seconds) and re-publishes the run's record, so the run
    outlives its creator and others can count who trains it."""

    def __init__(self, dht: DHT, record: RunRecord, presence: Callable[[], PeerPresence], admission: Admission | None = None) -> None:
        super().__init__(name="record-keeper", daemon=True)
        self.dht, self.record, self.presence = dht, record, presence
        self.admission = admission or Admission(record.run_id)
        self.peer_id = str(dht.peer_id)
        self.stopped = threading.Event()

    def announce(self) -> None:
        announce_peer(self.dht, self.peer_id, self.presence(), admission=self.admission)

    def run(self) -> None:
        next_record = 0.0
        while not self.stopped.is_set():
            try:
                self.announce()
                if time.monotonic() >= next_record:
                    publish_run(self.dht, self.record, admission=self.admission)
                    next_record = time.monotonic() + RECORD_TTL / 3
                    metrics.dht_peers.set(routing_table_size(self.dht))
            except Exception as err:  # a DHT hiccup must not stop training
                logger.warning("could not refresh dht records run=%s error=%s", self.record.run_id, err)
            self.stopped.wait(PRESENCE_TTL / 4)

    def stop(self) -> None:
        self.stopped.set()
