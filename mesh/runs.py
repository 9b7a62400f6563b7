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


def resolve_hyperparameters(task: Task, given: dict) -> dict:
    """``batch_size``, ``target_batch_size``, ``optimizer`` and ``lr``: the given ones (None: unset), then the task's
    suggestions, then the mesh's; the epoch is never smaller than one local batch. The one rule for every path that
    creates a run (``mesh peer --task``, the coordinator's API)."""
    suggested = {"batch_size": 16, "target_batch_size": 256, "optimizer": "adamw", "lr": 1e-3, **task.defaults}
    hyper = {name: suggested[name] if given.get(name) is None else given[name] for name in TASK_DEFAULTED}
    hyper["target_batch_size"] = max(hyper["target_batch_size"], hyper["batch_size"])
    return hyper


def _check_task_optimizer(task: Task, defaults: RunDefaults) -> None:
    """One line when the flags set what the task's own optimizer or scheduler decides."""
    if task.make_optimizer is not None and (defaults.optimizer is not None or defaults.weight_decay):
        raise ConfigError(f"task {task.name!r} makes its own optimizer: drop --optimizer and --weight-decay (its factory sets them)")
    if task.make_scheduler is not None and (defaults.lr_schedule != "constant" or defaults.warmup_epochs):
        raise ConfigError(f"task {task.name!r} makes its own lr scheduler: drop --lr-schedule and --warmup-epochs")


def create_record(run_id: str, task_spec: str, task: Task, defaults: RunDefaults) -> RunRecord:
    """The record of a new run: flags first, then the task's suggested hyperparameters."""
    _check_task_optimizer(task, defaults)
    hyper = resolve_hyperparameters(task, {name: getattr(defaults, name) for name in TASK_DEFAULTED})
    if task.make_optimizer is not None:
        hyper["optimizer"] = "task"  # the task's factory; its lr is the factory's too (the record's is the default)
    return make_record(
        run_id,
        task_spec,
        model_fingerprint(task, defaults.seed),
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


def join_or_create(
    dht: DHT, run_id: str, task_spec: str | None, task: Task | None, defaults: RunDefaults, admission: Admission | None = None
) -> RunRecord:
    """The run's record. Refuses (RunError) a task that differs from the run's, a missing run with no task, and a
    protected run this peer has no (or the wrong) secret for."""
    admission = admission or Admission(run_id)
    if not admission.protected:
        logger.warning(
            "run %s is open: any process that can reach the mesh can join it and average with it; "
            "protect it with --run-secret (docs/security.md)",
            run_id,
        )
    record = fetch_run(dht, run_id, admission=admission)
    if record is None:
        if task is None or task_spec is None:
            raise RunError(
                f"run {run_id!r} does not exist in this mesh (no live peer publishes it); "
                "pass --task NAME to create it, or check the run id"
            )
        record = create_record(run_id, task_spec, task, defaults)
        if not publish_run(dht, record, admission=admission):
            logger.warning("no DHT node accepted the run record yet run=%s; will retry", run_id)
        logger.info("created run run=%s task=%s fingerprint=%s protected=%s", run_id, task_spec, record.fingerprint, admission.protected)
        return fetch_run(dht, run_id, attempts=1, admission=admission) or record
    if task_spec is not None and task_spec != record.task:
        raise RunError(f"run {run_id!r} trains task {record.task!r}, not {task_spec!r}; drop --task or pick another run")
    if task is not None and model_fingerprint(task, record.seed) != record.fingerprint:
        raise RunError(
            f"this peer's task {task_spec!r} has parameter fingerprint {model_fingerprint(task, record.seed)}, "
            f"but run {run_id!r} expects {record.fingerprint}: the model's shapes differ; update the task code to the run's version"
        )
    logger.info(
        "joined run run=%s task=%s epoch_size=%d optimizer=%s lr=%g protected=%s",
        run_id,
        record.task,
        record.target_batch_size,
        record.optimizer,
        record.lr,
        admission.protected,
    )
    return record


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
