"""The peer process: join the DHT, join (or create) the run, train, leave cleanly within a bounded time.

Order matters: the DHT and the optimizer fork helper processes, so they start before any thread (metrics server,
record keeper). Shutdown runs in a fixed, logged order under a deadline; whatever is left is killed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from pathlib import Path

import torch

from mesh import checkpoint, httpserve, lifecycle, logs, metrics
from mesh.admission import Admission
from mesh.config import PeerConfig, RunDefaults, describe, parse_task_args
from mesh.coordinator_client import Coordinator
from mesh.dht import check_port_free, data_plane_host, start_dht, visible_maddrs
from mesh.errors import ConfigError, JoinError
from mesh.records import announce_peer
from mesh.reporting import Reporter
from mesh.runs import RecordKeeper, join_or_create, starting_presence
from mesh.tasks import load_task
from mesh.trackers import Trackers, open_trackers
from mesh.trainer import Trainer, pick_device

logger = logging.getLogger(__name__)


def run(config: PeerConfig) -> int:
    stop = lifecycle.install_stop_handlers()
    logger.info("peer config %s", describe(config))
    metrics.init_build_info("peer")

    # cheap checks first, so a typo costs no DHT start-up
    task_args = parse_task_args(config.task_arg)
    task = load_task(config.task, task_args) if config.task else None
    if config.checkpoint_dir is not None:
        checkpoint.ensure_writable(config.checkpoint_dir)
    device = pick_device(config.device)
    if config.metrics_port:
        check_port_free(config.host, config.metrics_port)
    if config.threads:
        torch.set_num_threads(config.threads)

    coordinator = Coordinator(config.coordinator, config.api_token) if config.coordinator else None
    if config.run == "auto":
        if coordinator is None:
            raise ConfigError("--run auto needs --coordinator URL: the coordinator knows which run most needs peers")
        config = dataclasses.replace(config, run=coordinator.pick_run())
        logger.info("picked run run=%s", config.run)
    if coordinator is not None and not config.join:
        config = dataclasses.replace(config, join=coordinator.bootstrap_addrs())
    coordinator_run = None
    if coordinator is not None:
        try:
            coordinator_run = coordinator.run_config(config.run)
        except JoinError as err:  # with --join the mesh does not need the coordinator: train, report later
            logger.warning("%s; training without it for now", err)
    if coordinator is not None and config.run_secret is None:
        # a coordinator with --run-secret-key hands the run's secret to peers holding its API token
        try:
            secret = coordinator.run_secret(config.run)
        except JoinError as err:
            logger.warning("%s; no run secret from the coordinator", err)
            secret = None
        if secret is not None:
            config = dataclasses.replace(config, run_secret=secret)
            logger.info("run secret from the coordinator run=%s", config.run)
    if task is None and coordinator_run is not None and coordinator_run.get("task") not in (None, "unknown"):
        # a run created through the coordinator's API: this peer can create its DHT record from it
        task_spec = coordinator_run["task"]
        config = dataclasses.replace(config, task=task_spec, **_hyperparameters(coordinator_run))
        task = load_task(task_spec, task_args)

    admission = Admission(config.run, config.run_secret)  # before any helper process forks: they count refusals
    dht = start_dht(config)
    trainer = keeper = reporter = None
    exit_code = 0
    try:
        logs.set_context(peer_id=str(dht.peer_id), run=config.run)
        logger.info("dht joined peer_id=%s addrs=%s", dht.peer_id, ",".join(visible_maddrs(dht)) or "-")
        record = join_or_create(dht, config.run, config.task, task, config, admission)
        # announced at once: a protected run's peers serve state only to peers with a signed presence
        announce_peer(dht, str(dht.peer_id), starting_presence(record.run_id, str(device)), admission=admission)
        if record.aggregation == "clipped" and config.data_plane == "hivemind":
            raise ConfigError(f"run {record.run_id!r} aggregates with clipping, which needs the data plane: drop --data-plane hivemind")
        task = task or load_task(record.task, task_args)
        trainer = Trainer(
            dht,
            record,
            task,
            device=device,
            peer_seed=zlib.crc32(str(dht.peer_id).encode()),
            bf16=config.bf16,
            checkpoint_dir=config.checkpoint_dir,
            checkpoint_every=config.checkpoint_every,
            eval_every=config.eval_every,
            trackers=Trackers(open_trackers(config.tracker, _tracker_dir(config), record.run_id, str(dht.peer_id)))
            if config.tracker
            else None,
            status_file=config.status_file,
            client_mode=config.client_mode,
            fault_nan_step=config.fault_nan_step,
            fault_gradient_scale=config.fault_gradient_scale,
            min_step_time=config.min_step_time,
            data_plane_host=None
            if config.data_plane == "hivemind"
            else data_plane_host(config.data_plane_host, config.host, config.announce, dht),
            nccl=config.data_plane == "nccl",
            admission=admission,
        )
        # hivemind's averagers set SIGINT to "ignore" in this process as they start (DecentralizedAverager.
        # run_in_background), so Ctrl-C did nothing: take the signals back
        lifecycle.install_stop_handlers(stop)
        keeper = RecordKeeper(dht, record, trainer.presence, admission)
        keeper.start()
        if coordinator is not None:
            addrs = visible_maddrs(dht)[:8]
            reporter = Reporter(
                coordinator,
                str(dht.peer_id),
                lambda: _heartbeat(trainer, addrs),
                on_run_ended=lambda status: stop.set(),
                interval=config.heartbeat_interval,
            )
            reporter.start()
        if config.metrics_port is not None:
            httpserve.serve(
                config.host if config.host != "0.0.0.0" else "0.0.0.0",
                config.metrics_port,
                lambda: {
                    "status": "ok",
                    "run_id": record.run_id,
                    "epoch": trainer.opt.local_epoch,
                },
            )
        logger.info(
            "training run=%s task=%s device=%s batch_size=%d target_batch_size=%d compression=%s",
            record.run_id,
            record.task,
            device,
            record.batch_size,
            record.target_batch_size,
            record.compression,
        )
        if config.min_peers > 1:
            trainer.write_status(state="waiting")
            trainer.wait_for_peers(config.min_peers, config.min_peers_timeout, stop)
        trainer.write_status(state="training")
        reason = trainer.run(stop, config.max_epochs, config.log_every)
        trainer.log_progress()
        logger.info("leaving run=%s reason=%s epoch=%d", record.run_id, reason, trainer.opt.local_epoch)
    finally:
        steps = []
        if reporter is not None:
            steps.append(("coordinator", reporter.stop))
        if keeper is not None:
            steps.append(("record keeper", keeper.stop))
        if trainer is not None:
            steps += [
                ("checkpoint", trainer.save_checkpoint),
                ("status", lambda: trainer.write_status(state="left")),
                ("optimizer", trainer.shutdown),
            ]
        steps.append(("dht", dht.shutdown))
        if not lifecycle.run_steps_with_deadline(steps, config.shutdown_timeout):
            exit_code = 1
        lifecycle.kill_descendants()
        logger.info("peer stopped exit_code=%d", exit_code)
    return exit_code


# the run settings a coordinator's run carries (api.models.Hyperparameters, the same names), read from it and reported
# to it: every run setting, so that a new one cannot be left out
HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(RunDefaults))


def _hyperparameters(run: dict) -> dict:
    hyper = run.get("hyperparameters") or {}
    # None: the task's default; optimizer "task": the task's own factory decides (it is not a --optimizer choice)
    return {
        name: hyper[name] for name in HYPERPARAMETERS if hyper.get(name) is not None and not (name == "optimizer" and hyper[name] == "task")
    }


def _tracker_dir(config: PeerConfig) -> Path:
    if config.tracker_dir is not None:
        return config.tracker_dir
    return config.checkpoint_dir / "trackers" if config.checkpoint_dir is not None else Path("mesh-trackers") / config.run


def _heartbeat(trainer: Trainer, addrs: list[str]) -> dict:
    """The body of a heartbeat: a snapshot of the trainer's progress (read without locking: plain attributes)."""
    p = trainer.progress
    return {
        "run_id": trainer.record.run_id,
        "task": trainer.record.task,
        "addrs": addrs,
        "device": str(trainer.device),
        "gpu_name": trainer.gpu_name,
        "epoch": int(p.epoch),
        "samples_per_second": float(p.global_samples_per_second),
        "loss": None if p.loss != p.loss else float(p.loss),
        "lr": float(p.lr) if math.isfinite(p.lr) else None,
        # the held-out loss of this epoch (the trainer evaluates before it shows the epoch), none between evaluations
        "eval_loss": float(p.eval_loss) if p.eval_epoch == p.epoch and math.isfinite(p.eval_loss) else None,
        "hyperparameters": {name: getattr(trainer.record, name) for name in HYPERPARAMETERS},  # a run first seen there
    }


if __name__ == "__main__":  # pragma: no cover - use `mesh peer`
    raise SystemExit("run `mesh peer --help`")
