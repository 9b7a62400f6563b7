"""The collaborative trainer: a local training loop on top of hivemind.Optimizer.

Each local step runs forward and backward on this peer's device and hands the gradient to hivemind, which
accumulates toward the run's global ``target_batch_size``. When the swarm has accumulated that many samples, the
peers that are ready form groups through the DHT, all-reduce their gradients, and every member steps: one epoch.
A failed round degrades to the local gradient and is counted; a non-finite gradient is dropped before hivemind
ever sees it, so it is never sent and never applied.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression, Uniform8BitQuantization

from mesh import atomicfile, checkpoint, epochplan, metrics
from mesh.admission import Admission
from mesh.averager import MeshGradientAverager, MeshStateAverager, parameter_digest
from mesh.data import Batches
from mesh.diloco import PseudoGradientAverager, outer_optimizer_factory, outer_statistics
from mesh.errors import ConfigError, RunError
from mesh.planeround import PlaneRound
from mesh.records import PeerPresence, RunRecord, fetch_peers, fingerprint
from mesh.rounds import wire_bytes
from mesh.schedule import clip_before_step, scheduler_factory
from mesh.tasks.base import Batch, Task
from mesh.tracker import MeshProgressTracker
from mesh.wirebytes import TcpTraffic

logger = logging.getLogger(__name__)

# Tensors smaller than this are sent as fp16 even in 8-bit mode: quantizing a bias of a few values costs more
# accuracy than it saves bytes.
EIGHT_BIT_MIN_SIZE = 2**12
PROGRESS_REPORT_PERIOD = 1.0  # seconds between a peer's progress reports to the DHT (hivemind: every local step)
NEVER = sys.maxsize  # an average_state_every that no epoch reaches
PROGRESS_EXPIRATION = 10.0  # seconds a progress report counts (hivemind: 60); idle peers re-report at half that
LEAVE_WAIT = 5.0  # seconds a leaving member of a standing group waits to tag along in the group's next round


def make_compression(name: str) -> hivemind.compression.CompressionBase:
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return SizeAdaptiveCompression(EIGHT_BIT_MIN_SIZE, less=Float16Compression(), greater_equal=Uniform8BitQuantization())
    raise ConfigError(f"unknown compression {name!r}: use none, fp16 or 8bit")


def make_optimizer_factory(name: str, lr: float, weight_decay: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise ConfigError(f"unknown optimizer {name!r}: use {', '.join(classes)}")
    return lambda params: classes[name](params, lr=lr, weight_decay=weight_decay)


def task_optimizer_factory(task: Task, record: RunRecord) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer the run steps: the task's own factory (the record says ``optimizer=task``) or a built-in one,
    clipped before every step under ``--clip-grad-norm`` either way."""
    if record.optimizer != "task":
        make = make_optimizer_factory(record.optimizer, record.lr, record.weight_decay)
    elif task.make_optimizer is not None:
        make = task.make_optimizer
    else:
        raise RunError(f"run {record.run_id!r} uses its task's own optimizer, but task {task.name!r} has no make_optimizer")
    clip = record.clip_grad_norm
    return (lambda params: clip_before_step(make(params), clip)) if clip is not None else make


def pick_device(requested: str) -> torch.device:
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested} was asked for but torch sees no CUDA device; use --device auto or cpu")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
        return device
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient is finite, in one read of each (no temporaries): a sum is NaN or ±inf if any summand is.

    ``torch.isfinite(g).all()`` is composed of several passes with a temporary each (``abs``, two comparisons, an
    ``and``): 177 ms a step on a 25M-parameter model on one CPU thread, more than its backward pass; the sums take 9.
    A gradient whose finite values sum beyond float32's range (~3.4e38) also counts as non-finite; a step with it
    would be no better. Half-precision gradients are summed in float32, so they overflow only where float32 does.
    Note: a CPU-GPU sync point on CUDA."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads])).all())


def nccl_device(device: torch.device) -> torch.device | None:
    """The device this peer offers NCCL on (--data-plane nccl), or None (with one line saying why) off CUDA or
    without NCCL in this torch build: its groups then use gloo."""
    if device.type != "cuda" or not torch.distributed.is_nccl_available():
        logger.warning(
            "--data-plane nccl: this peer is on %s%s; its groups average on gloo",
            device,
            "" if device.type != "cuda" else " without NCCL in torch",
        )
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class MeshOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with the mesh's averagers (:mod:`mesh.averager`): each round's group closes once every
    live peer is in, gradients move on torch's process groups, and parameters are averaged only when they can have
    drifted apart (a failed, partial or local-only round, a new member) and every ``state_every`` epochs."""

    tracker: MeshProgressTracker

    def __init__(self, *, state_every: int, admission: Admission, inner_steps: int | None = None, **kwargs: Any) -> None:
        # hivemind's names (progress key, averager prefixes, their RPCs) are the run's namespace: under a run
        # secret, a name only admitted peers can derive (mesh/admission.py); metrics keep the run id
        self.admission, self.run_label = admission, admission.run_id
        kwargs["run_id"] = admission.namespace
        self.state_every = state_every
        # DiLoCo (mesh/diloco.py): an epoch is inner_steps local steps per live peer, and the averaged tensors are
        # the pseudo-gradients against the outer optimizer's parameters
        self.inner_steps = inner_steps
        self.outer_steps = 0
        self.pseudo_gradient_norm = math.nan
        try:
            super().__init__(average_state_every=state_every, delay_state_averaging=False, **kwargs)
        except BaseException:
            # hivemind starts its progress tracker's thread and its averagers' processes as it goes: a failure
            # part-way must stop those already started, or the process never exits
            for part in ("grad_averager", "state_averager", "tracker"):
                if getattr(self, part, None) is not None:
                    getattr(self, part).shutdown()
            raise
        if isinstance(self.grad_averager, PseudoGradientAverager):
            self.grad_averager.outer_parameters = self.optimized_parameters
        if self.grad_averager is not None:
            self.grad_averager.on_state_group = self.state_averager.set_target_group_size
            self.grad_averager.local_rate = lambda: self.tracker.performance_ema.samples_per_second
            self.grad_averager.local_epoch = lambda: self.local_epoch
            # the round that ends an epoch after which a routine parameter round is due checks the parameters first
            self.grad_averager.check_parameters = lambda: (self.local_epoch + 1) % self.state_every == 0

    @property
    def average_state_every(self) -> int:  # read by hivemind every epoch, right after the gradient round
        averager = getattr(self, "grad_averager", None)
        if averager is None:
            return self.state_every
        if averager.wants_state_averaging:
            return 1
        if averager.parameters_agree:  # the routine round is due, and its group already found everyone equal
            return NEVER
        return self.state_every

    @average_state_every.setter
    def average_state_every(self, value: int) -> None:
        self.state_every = value

    def _make_progress_tracker(self, target_batch_size: int, **kwargs: Any) -> MeshProgressTracker:
        # hivemind.Optimizer._make_progress_tracker with the class swapped (tests/unit/test_hivemind_api.py pins it)
        return MeshProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs: Any) -> MeshStateAverager:
        # hivemind.Optimizer._make_state_averager with the class swapped (tests/unit/test_hivemind_api.py pins it)
        return MeshStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            admission=self.admission,
            **kwargs,
        )

    def step(self, *args: Any, **kwargs: Any):
        live = max(1, self.tracker.global_progress.num_peers)
        if self.grad_averager is not None:
            self.grad_averager.set_target_group_size(live)
        self.state_averager.set_target_group_size(live)
        if self.inner_steps is not None:  # DiLoCo: the outer step is due after inner_steps local steps per live peer
            batch = kwargs.get("batch_size") or self.batch_size_per_step or 1
            self.target_batch_size = self.tracker.target_batch_size = self.inner_steps * batch * live
        epoch, downloads = self.local_epoch, self.state_downloads
        result = super().step(*args, **kwargs)
        if self.local_epoch != epoch and self.grad_averager is not None:
            if self.inner_steps is not None and self.state_downloads == downloads:
                self._after_outer_step()
            self._after_round(epoch, self.grad_averager.take_group())
        return result

    @torch.no_grad()
    def _after_outer_step(self) -> None:
        # the optimizer's gradients are the averaging buffer: the pseudo-gradient it just applied
        grads = [param.grad for param in self.optimized_parameters if param.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]) if grads else None
        self.pseudo_gradient_norm = float(torch.linalg.vector_norm(norms)) if norms is not None else 0.0
        self.outer_steps += 1

    def _after_round(self, epoch: int, group: tuple[dict, bool] | None) -> None:
        """After an ok round that ended ``epoch``: catch up if another member was in a later epoch; else, if the
        group was settled (every live peer in, one epoch, nobody new, drifted or leaving: :func:`settled`), plan
        this peer's share of the next epoch (:mod:`mesh.epochplan`)."""
        if group is None:
            return
        gathered, calm = group
        epochs = [data.get("epoch") for data in gathered.values() if isinstance(data, dict)]
        ahead = max((e for e in epochs if isinstance(e, int)), default=epoch)
        if ahead > epoch:
            # hivemind checks the epoch against the swarm's once per epoch, from progress reports that may not
            # show the others' new epoch yet; a member behind would then count its epochs one short of theirs for
            # good (ending each epoch early to catch up, in the same rounds): it takes the newest state instead
            logger.info("behind the group's epoch mine=%d group=%d; taking the newest state", epoch, ahead)
            self.load_state_from_peers()
            return
        # plan only in a settled group (a member that asks to resync is joining or recovering; hivemind's estimate
        # decides while it does)
        members = epochplan.members_from_gathered(gathered) if calm else None
        me = str(self.dht.peer_id)
        if not members or me not in {member.key for member in members}:
            return
        steps = epochplan.plan_steps(members, self.target_batch_size)
        batch = next(member.batch_size for member in members if member.key == me)
        self.tracker.plan_epoch(self.local_epoch, steps[me] * batch, len(members))
        logger.debug("epoch plan epoch=%d steps=%d samples=%d", self.local_epoch, steps[me], steps[me] * batch)

    @property
    def optimized_parameters(self) -> list[torch.Tensor]:
        """The tensors the optimizer steps: with an offloaded optimizer (hivemind's default with gradient averaging)
        its own copy of the model's parameters, which every step copies into the model."""
        return [param for group in self.opt.param_groups for param in group["params"]]

    @torch.no_grad()
    def set_optimized_parameters(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite the optimizer's parameters (and the model's, when they are a copy): after a checkpoint is
        loaded into the model, the optimizer's copy still holds the initial parameters, and its next step would
        write those back into the model."""
        with self.state_averager.lock_averaged_tensors:
            for param, tensor in zip(self.optimized_parameters, tensors, strict=True):
                param.copy_(tensor)
            for main, param in zip(self.state_averager.main_parameters, self.optimized_parameters):
                if main is not param:
                    main.copy_(param)

    @torch.no_grad()
    def share_averaged_statistics(self) -> None:
        """Point the optimizer's averaged statistics (``average_opt_statistics``: DiLoCo's outer momentum) at the
        state averager's tensors again. hivemind's averager holds the optimizer's state tensors themselves, but
        ``optimizer.load_state_dict`` (a state download, a checkpoint) puts new ones in their place: parameter
        rounds then averaged the stale tensors, and members that had downloaded state stepped with momentum the
        others did not have (seen: equal outer parameters, then different ones after the next outer step)."""
        averager, params = self.state_averager, self.optimized_parameters
        keys = averager.opt_keys_for_averaging
        if not keys:
            return
        with averager.get_tensors() as averaged:
            shared = iter(averaged[len(params) : len(params) * (1 + len(keys))])
            for key in keys:  # the order of hivemind's TrainingStateAverager._local_tensors
                for param in params:
                    tensor, current = next(shared), averager.optimizer.state[param][key]
                    if current is not tensor:
                        tensor.copy_(current)
                        averager.optimizer.state[param][key] = tensor

    def shutdown(self) -> None:
        averager = self.grad_averager
        if averager is not None and not averager.leaving:
            averager.leaving = True  # a round this peer tags along in tells the group it leaves
            # between rounds in a standing group the others will wait for this peer in their next round: join it
            # with weight 0 (they still average), briefly; past that they find its connections closed (one
            # failed round)
            pending = self.scheduled_grads
            if pending is None and averager.in_standing_group:
                pending = averager.schedule_step()
            if isinstance(pending, PlaneRound) and pending.inner is None and not pending.triggered:
                self.scheduled_grads = None
                averager.tag_along(pending, min(self.averaging_timeout, LEAVE_WAIT))
        super().shutdown()

    @property
    def rounds(self) -> dict[str, int]:
        return dict(self.grad_averager.rounds) if self.grad_averager is not None else {}

    @property
    def last_group_size(self) -> int:
        return self.grad_averager.last_group_size if self.grad_averager is not None else 0

    def load_state_from_peers(self, **kwargs) -> None:
        if getattr(self, "grad_averager", None) is not None:
            self.grad_averager.leave_standing_group()  # the next round finds its group through matchmaking
        started, before = time.perf_counter(), self.local_epoch
        super().load_state_from_peers(**kwargs)
        self.share_averaged_statistics()
        if self.local_epoch != before:
            self.state_downloads += 1
            metrics.state_downloads.labels(self.run_label).inc()
            metrics.state_download_duration.labels(self.run_label).observe(time.perf_counter() - started)
            logger.info("loaded state from peers epoch=%d seconds=%.2f", self.local_epoch, time.perf_counter() - started)
        else:
            # hivemind returns without state when no peer could serve it (e.g. the swarm's progress records outlive
            # peers that just left); back off instead of retrying in a tight loop
            logger.warning("no peer could serve the newest state (epoch %d); retrying", self.tracker.global_epoch)
            time.sleep(1.0)

    state_downloads: int = 0


@dataclass
class Progress:
    """What the peer tells people (logs, status file, ``mesh up``)."""

    epoch: int = 0
    local_steps: int = 0
    samples: int = 0
    epoch_samples: int = 0  # this peer's samples in the last epoch
    loss: float = float("nan")
    lr: float = float("nan")  # the optimizer's, by the run's schedule (the same on every peer at one epoch)
    eval_loss: float = float("nan")  # on the task's held-out data, at the last evaluation (--eval-every)
    eval_epoch: int = -1  # the epoch of that evaluation
    global_samples_per_second: float = 0.0
    last_group_size: int = 0
    rounds: dict[str, int] = field(default_factory=dict)
    nonfinite_skips: int = 0
    state_downloads: int = 0
    data_plane_builds: int = 0
    data_plane_fallbacks: int = 0
    standing_rounds: int = 0  # ok rounds in a standing group (no matchmaking)
    nccl_rounds: int = 0  # ok rounds whose gradients moved on NCCL
    state_rounds_skipped: int = 0  # routine parameter rounds not needed: the group's parameters were equal
    outer_steps: int = 0  # --averaging diloco: outer optimizer steps taken
    inner_steps: int = 0  # --averaging diloco: this peer's local steps in the last outer step
    pseudo_gradient_norm: float = float("nan")  # --averaging diloco: of the last outer step
    tcp_sent_bytes: int = 0  # what the training process sent over TCP (the data plane; kernel counters)
    tcp_received_bytes: int = 0
    clipped_outliers: int = 0  # --aggregation clipped: contributions far above the group's median
    unbounded_steps_skipped: int = 0  # --aggregation clipped: failed rounds stepped with no gradient
    refused: dict[str, int] = field(default_factory=dict)  # admission refusals by reason (mesh/admission.py)
    _epoch_first_step: int = 0
    _epoch_losses: list[float] = field(default_factory=list)
    _epoch_started: float = field(default_factory=time.monotonic)
    _epoch_first_sample: int = 0

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        public = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return {**public, **extra, "time": time.time()}


class Trainer:
    """Owns the model, the hivemind optimizer and the loop. Create it after the DHT, before any thread."""

    def __init__(
        self,
        dht: hivemind.DHT,
        record: RunRecord,
        task: Task,
        *,
        device: torch.device,
        peer_seed: int,
        bf16: bool = False,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 10,
        eval_every: int = 10,
        trackers: Any = None,
        status_file: Path | None = None,
        client_mode: bool = False,
        fault_nan_step: int | None = None,
        fault_gradient_scale: float | None = None,
        min_step_time: float | None = None,
        data_plane_host: str | None = None,
        nccl: bool = False,
        admission: Admission | None = None,
    ) -> None:
        self.record, self.task, self.device = record, task, device
        self.admission = admission or Admission(record.run_id)
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.eval_every = eval_every if task.evaluate is not None else 0
        self.trackers = trackers  # mesh.trackers.Trackers: a row per epoch
        self.status_file, self.fault_nan_step, self.min_step_time = status_file, fault_nan_step, min_step_time
        self.fault_gradient_scale = fault_gradient_scale
        self.peer_id = str(dht.peer_id)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

        torch.manual_seed(record.seed)  # every peer of the run starts from the same parameters
        self.model = task.make_model().to(device)
        if fingerprint(self.model) != record.fingerprint:
            raise RunError(
                f"task {task.name!r} builds a model with fingerprint {fingerprint(self.model)}, but run {record.run_id!r} "
                f"expects {record.fingerprint}; join with the run's task and settings"
            )
        self.batches = Batches(task.make_batches(record.batch_size, peer_seed), task.name)
        compression = make_compression(record.compression)
        diloco = record.averaging == "diloco"
        task_optimizer = task_optimizer_factory(task, record)
        # DiLoCo: the task's optimizer steps the model every local step (inner); hivemind's steps the outer one
        params = task.param_groups(self.model) if task.param_groups is not None else list(self.model.parameters())
        self.inner_opt = task_optimizer(params) if diloco else None
        gradient_averager = partial(
            PseudoGradientAverager if diloco else MeshGradientAverager,
            run_id=record.run_id,
            compression_name=record.compression,
            data_plane_host=data_plane_host,
            nccl_device=nccl_device(device) if nccl else None,
            aggregation=record.aggregation,
            admission=self.admission,
        )
        self.opt = MeshOptimizer(
            dht=dht,
            admission=self.admission,
            params=params,
            optimizer=outer_optimizer_factory(record.outer_lr, record.outer_momentum) if diloco else task_optimizer,
            # the lr by global epoch (mesh/schedule.py): hivemind steps it with the run's epoch, a late joiner's too
            scheduler=None if diloco else self._scheduler(task, record),
            batch_size_per_step=record.batch_size,
            target_batch_size=record.inner_steps * record.batch_size if diloco else record.target_batch_size,
            inner_steps=record.inner_steps if diloco else None,
            # DiLoCo's outer state is the optimizer's (offloaded) parameters and its momentum: a parameter round
            # averages both, so members that stepped apart agree on all of it again
            offload_optimizer=True if diloco else None,
            average_opt_statistics=outer_statistics(record.outer_momentum) if diloco else (),
            matchmaking_time=record.matchmaking_time,
            averaging_timeout=record.averaging_timeout,
            load_state_timeout=max(60.0, record.averaging_timeout),
            use_local_updates=record.averaging == "local",
            grad_averager_factory=None if record.averaging == "local" else gradient_averager,
            grad_compression=compression,
            # parameter rounds exist to make members agree again: in fp32, whatever the gradients' wire format.
            # hivemind's all-reduce keeps each member's own part of the mean uncompressed and sends the others'
            # compressed, so in fp16 (or 8 bits) members ended a parameter round with different parameters, and
            # kept them apart from then on (DiLoCo's kill-and-join test saw every member's digest differ)
            state_averaging_compression=NoCompression(),
            # local updates: parameters are all there is to average, every epoch
            state_every=1 if record.averaging == "local" else record.average_state_every,
            # a peer that stopped reporting (killed, stopped, partitioned) leaves the live count, and so the size a
            # group waits for, this many seconds after its last report
            # hivemind re-reads the swarm's progress at most every 10 s by default, sooner only when its (first,
            # start-up-slow) estimate says the epoch ends sooner; with epochs of a second or two a peer then counts
            # only its own samples and every epoch grows to peers x target. Re-read at least every 2 s, and
            # at the start of every epoch (_on_new_epoch).
            tracker_opts={"metadata_expiration": PROGRESS_EXPIRATION, "max_refresh_period": 2.0, "report_period": PROGRESS_REPORT_PERIOD},
            client_mode=client_mode,
            verbose=False,
        )
        try:
            if self.opt.grad_averager is not None:
                self.opt.grad_averager.gradient_wire_bytes = wire_bytes(
                    list(self.model.parameters()), record.compression, EIGHT_BIT_MIN_SIZE
                )
            self.gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
            metrics.init_peer(record.run_id, str(device), self.gpu_name)
            self.progress = Progress()
            self.traffic = TcpTraffic()
            self._epoch_times: list[float] = []
            self._resume()
        except BaseException:
            # the optimizer has started helper processes and threads (progress tracker, averagers): a peer that
            # cannot start must not leave them running, or the process never exits
            self.opt.shutdown()
            raise

    @staticmethod
    def _scheduler(task: Task, record: RunRecord) -> Any:
        """hivemind's ``scheduler=``: the task's own, else the run's --lr-schedule (None: a constant lr)."""
        return task.make_scheduler or scheduler_factory(record.lr_schedule, record.warmup_epochs, record.total_epochs)

    def _resume(self) -> None:
        if self.checkpoint_dir is None:
            return
        try:
            state = checkpoint.load(self.checkpoint_dir)
        except checkpoint.UnreadableCheckpoint as err:
            others = [peer for peer in fetch_peers(self.opt.dht, self.record.run_id, self.admission) if peer != self.peer_id]
            if not others:
                raise RunError(
                    f"{err}, and no live peer of run {self.record.run_id!r} has its state to take instead; "
                    f"put a good checkpoint at {err.path}, or start again to begin from scratch"
                ) from None
            logger.warning("%s; taking the state from the %d live peer(s) of run %s", err, len(others), self.record.run_id)
            return
        if state is None:
            return
        if state.get("fingerprint") != self.record.fingerprint or state.get("run_id") != self.record.run_id:
            raise ConfigError(
                f"checkpoint in {self.checkpoint_dir} belongs to run {state.get('run_id')!r} "
                f"(fingerprint {state.get('fingerprint')}); use another --checkpoint-dir for run {self.record.run_id!r}"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt.share_averaged_statistics()
        if self.inner_opt is not None and state.get("inner_optimizer") is not None:
            self.inner_opt.load_state_dict(state["inner_optimizer"])
        # the optimizer's own parameters: DiLoCo's outer ones as saved, else the model's
        outer = state.get("outer_parameters") if self.inner_opt is not None else None
        self.opt.set_optimized_parameters(outer if outer is not None else [p.detach() for p in self.model.parameters()])
        if outer is not None:  # that copied the outer parameters into the model, whose own had moved on from them
            self.model.load_state_dict(state["model"])
        if isinstance(state.get("data"), dict):
            self.batches.load_state_dict(state["data"])
        self.progress.epoch = self.opt.local_epoch
        logger.info("resumed from checkpoint dir=%s epoch=%d", self.checkpoint_dir, self.opt.local_epoch)

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        state = {
            "run_id": self.record.run_id,
            "task": self.record.task,  # what builds the model (mesh export)
            "fingerprint": self.record.fingerprint,
            "epoch": self.opt.local_epoch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "progress": self.progress.snapshot(),
            "data": self.batches.state_dict(),  # where this peer's data is: a restart goes on from there
        }
        if self.inner_opt is not None:  # DiLoCo: the outer parameters (the optimizer's) and the inner optimizer
            state["outer_parameters"] = [param.detach().cpu().clone() for param in self.opt.optimized_parameters]
            state["inner_optimizer"] = self.inner_opt.state_dict()
        path = checkpoint.save(self.checkpoint_dir, state)
        logger.info("checkpoint written path=%s epoch=%d", path, self.opt.local_epoch)

    def step(self) -> None:
        """One local batch: forward, backward, and hand the gradient to hivemind (which may run an epoch)."""
        started = time.perf_counter()
        batch = to_device(next(self.batches), self.device)
        with self.autocast:
            loss = self.task.loss(self.model, batch)
        self.progress.local_steps += 1
        if self.fault_nan_step is not None and self.progress.local_steps == self.fault_nan_step:
            loss = loss * float("nan")
        (loss if self.fault_gradient_scale is None else loss * self.fault_gradient_scale).backward()
        if not gradients_finite(self.model):
            # never hand a NaN/inf to hivemind: it would be sent to the group and applied by everyone
            self.opt.zero_grad()
            self.progress.nonfinite_skips += 1
            metrics.nonfinite_skips.labels(self.record.run_id).inc()
            logger.warning("dropped non-finite gradient step=%d epoch=%d", self.progress.local_steps, self.opt.local_epoch)
            return
        if self.min_step_time is not None:
            time.sleep(max(0.0, self.min_step_time - (time.perf_counter() - started)))
        if self.inner_opt is not None:
            self.inner_opt.step()
        self.opt.step(batch_size=self.record.batch_size)
        self.opt.zero_grad()
        self.progress._epoch_losses.append(loss.item())  # CPU-GPU sync point, once per step
        self.progress.samples += self.record.batch_size
        run = self.record.run_id
        metrics.steps.labels(run).inc()
        metrics.samples.labels(run).inc(self.record.batch_size)
        metrics.step_duration.labels(run).observe(time.perf_counter() - started)
        if self.opt.local_epoch != self.progress.epoch:
            self._on_new_epoch()

    def _on_new_epoch(self) -> None:
        if not self.opt.tracker.has_plan(self.opt.local_epoch):  # a planned epoch ends by the plan, not the estimate
            self.opt.tracker.refresh()
        now, p = time.monotonic(), self.progress
        # before the progress shows the new epoch: a heartbeat that reports it reports its lr and evaluation too
        p.lr = float(self.opt.param_groups[0]["lr"])
        metrics.lr.labels(self.record.run_id).set(p.lr)
        if self.eval_every and self.opt.local_epoch % self.eval_every == 0:
            self.evaluate(self.opt.local_epoch)
        epochs_advanced = max(1, self.opt.local_epoch - p.epoch)
        self._epoch_times.append((now - p._epoch_started) / epochs_advanced)
        recent = self._epoch_times[-5:]
        p.global_samples_per_second = self.record.target_batch_size / (sum(recent) / len(recent))
        p.epoch, p._epoch_started = self.opt.local_epoch, now
        p.epoch_samples, p._epoch_first_sample = p.samples - p._epoch_first_sample, p.samples
        epoch_steps, p._epoch_first_step = p.local_steps - p._epoch_first_step, p.local_steps
        if self.inner_opt is not None:
            self._on_outer_step(epoch_steps)
        if p._epoch_losses:
            p.loss = sum(p._epoch_losses) / len(p._epoch_losses)
            p._epoch_losses = []
        p.last_group_size = self.opt.last_group_size
        p.rounds = dict(self.opt.rounds)
        p.state_downloads = self.opt.state_downloads
        averager = self.opt.grad_averager
        if averager is not None:  # counted by the averager; brought to this process's metrics here
            for name, value, counter in (
                ("data_plane_builds", averager.data_plane_builds, metrics.data_plane_builds),
                ("data_plane_fallbacks", averager.data_plane_fallbacks, metrics.data_plane_fallbacks),
                ("standing_rounds", averager.standing_rounds, metrics.standing_rounds),
                ("nccl_rounds", averager.nccl_rounds, metrics.nccl_rounds),
                ("state_rounds_skipped", averager.state_rounds_skipped, metrics.state_rounds_skipped),
                ("clipped_outliers", averager.clipped_outliers, metrics.clipped_outliers),
                ("unbounded_steps_skipped", averager.unbounded_steps_skipped, metrics.unbounded_steps_skipped),
            ):
                self._bring(name, value, counter)
        for reason, total in self.admission.refusals().items():  # counted here and in the averagers' processes
            metrics.refused.labels(self.record.run_id, reason).inc(total - p.refused.get(reason, 0))
            p.refused[reason] = total
        sent, received = self.traffic.update()
        self._bring("tcp_sent_bytes", sent, metrics.tcp_sent_bytes)
        self._bring("tcp_received_bytes", received, metrics.tcp_received_bytes)
        metrics.epoch.labels(self.record.run_id).set(p.epoch)
        metrics.loss.labels(self.record.run_id).set(p.loss)
        metrics.samples_per_second.labels(self.record.run_id).set(p.global_samples_per_second)
        if self.trackers is not None:
            self.trackers.log(
                {
                    "epoch": p.epoch,
                    "loss": p.loss,
                    "eval_loss": p.eval_loss if p.eval_epoch == p.epoch else float("nan"),
                    "lr": p.lr,
                    "samples_per_second": p.global_samples_per_second,
                    "group": p.last_group_size,
                    "rounds_ok": p.rounds.get("ok", 0),
                    "rounds_failed": p.rounds.get("failed", 0),
                }
            )
        self.write_status()
        if self.checkpoint_dir is not None and p.epoch % self.checkpoint_every == 0:
            self.save_checkpoint()

    def evaluate(self, epoch: int) -> None:
        """The task's held-out loss of the model as it is now (at ``epoch``), into the progress and
        ``mesh_peer_eval_loss``. A failing evaluate (the user's code) costs a WARNING line and a NaN, never the
        training."""
        assert self.task.evaluate is not None
        p, training = self.progress, self.model.training
        try:
            self.model.eval()
            with torch.no_grad(), self.autocast:
                p.eval_loss = float(self.task.evaluate(self.model))
        except Exception as err:  # noqa: BLE001 - the task's code
            p.eval_loss = float("nan")
            logger.warning("evaluation failed epoch=%d error=%s: %s", epoch, type(err).__name__, " ".join(str(err).split()))
        finally:
            self.model.train(training)
        p.eval_epoch = epoch
        metrics.eval_loss.labels(self.record.run_id).set(p.eval_loss)
        logger.info("evaluated epoch=%d eval_loss=%.6g", epoch, p.eval_loss)

    def _bring(self, name: str, total: int, counter: Any) -> None:
        """A running total counted elsewhere (averager, optimizer, kernel) into its counter and the progress."""
        counter.labels(self.record.run_id).inc(total - getattr(self.progress, name))
        setattr(self.progress, name, total)

    def _on_outer_step(self, steps: int) -> None:
        p, run = self.progress, self.record.run_id
        if self.opt.outer_steps == p.outer_steps:
            return  # the epoch came with downloaded state, not an outer step of this peer's
        self._bring("outer_steps", self.opt.outer_steps, metrics.outer_steps)
        p.inner_steps, p.pseudo_gradient_norm = steps, self.opt.pseudo_gradient_norm
        metrics.inner_steps.labels(run).set(steps)
        metrics.pseudo_gradient_norm.labels(run).set(p.pseudo_gradient_norm)
        # the outer parameters' digest: members of a group that averaged print the same one (bit-identical)
        logger.info(
            "outer step epoch=%d inner_steps=%d pseudo_gradient_norm=%.6g group=%d parameters_digest=%r",
            self.opt.local_epoch,
            steps,
            p.pseudo_gradient_norm,
            self.opt.last_group_size,
            parameter_digest(self.opt.optimized_parameters),
        )

    def write_status(self, **extra: Any) -> None:
        """Write the status file; ``state`` (waiting, training, left) is remembered for later epochs' writes."""
        self.state = extra.pop("state", getattr(self, "state", "starting"))
        if self.status_file is None:
            return
        data = self.progress.snapshot(run_id=self.record.run_id, peer_id=self.peer_id, device=str(self.device), state=self.state, **extra)
        atomicfile.write(self.status_file, json.dumps(data))

    def presence(self) -> PeerPresence:
        p = self.progress
        return PeerPresence(
            run_id=self.record.run_id,
            epoch=int(p.epoch),
            samples_per_second=float(p.global_samples_per_second),
            loss=None if math.isnan(p.loss) else float(p.loss),
            device=str(self.device),
            time=time.time(),
        )

    def wait_for_peers(self, count: int, timeout: float, stop: threading.Event) -> int:
        """Block until ``count`` peers announce this run (or ``timeout``/``stop``); returns how many were seen.
        Needs the RecordKeeper running: it announces this peer too."""
        deadline, seen = time.monotonic() + timeout, 0
        while not stop.is_set() and time.monotonic() < deadline:
            seen = len(fetch_peers(self.opt.dht, self.record.run_id, self.admission))
            if seen >= count:
                break
            stop.wait(0.5)
        # hivemind's progress tracker counts a peer only once it has reported samples, and refreshes on its own
        # schedule (seconds); left alone, a fast peer would finish its first epoch before it sees the others.
        # So: take one step (which reports), then refresh the tracker until it counts everyone.
        if seen >= count and not stop.is_set():
            self.step()
            while not stop.is_set() and time.monotonic() < deadline:
                self.opt.tracker.refresh()
                seen = self.opt.tracker.global_progress.num_peers
                if seen >= count:
                    logger.info("peers ready peers=%d", seen)
                    return seen
                stop.wait(0.25)
        if not stop.is_set():
            logger.warning("only %d of %d peers after %.0fs; training with them", seen, count, timeout)
        return seen

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def run(self, stop: threading.Event, max_epochs: int | None = None, log_every: float = 10.0) -> str:
        """Train until ``stop`` is set or ``max_epochs`` is reached; returns why it stopped.

        On a terminal, one status line is redrawn in place; elsewhere (containers, files) one log line is written
        per epoch, and every ``log_every`` seconds while an epoch takes longer."""
        live = sys.stderr.isatty()
        last_epoch, next_line, next_draw = self.progress.epoch, time.monotonic() + log_every, 0.0
        try:
            while not stop.is_set():
                if max_epochs is not None and self.opt.local_epoch >= max_epochs:
                    return "max_epochs"
                self.step()
                now = time.monotonic()
                if live and now >= next_draw:
                    next_draw = now + 0.5
                    sys.stderr.write("\r\x1b[2K" + self.status_line())
                    sys.stderr.flush()
                elif not live and (self.progress.epoch != last_epoch or now >= next_line):
                    last_epoch, next_line = self.progress.epoch, now + log_every
                    self.log_progress()
            return "stopped"
        finally:
            if live:
                sys.stderr.write("\r\x1b[2K" + self.status_line() + "\n")

    def status_line(self) -> str:
        p = self.progress
        return (
            f"epoch {p.epoch}  loss {p.loss:.4f}  {p.global_samples_per_second:.1f} samples/s (run)  group {p.last_group_size}"
            f"  rounds ok {self.opt.rounds.get('ok', 0)} failed {self.opt.rounds.get('failed', 0)}  steps {p.local_steps}"
        )

    def log_progress(self) -> None:
        p = self.progress
        logger.info(
            "progress epoch=%d loss=%.4f lr=%.6g global_samples_per_second=%.1f group=%d steps=%d epoch_samples=%d rounds_ok=%d "
            "rounds_failed=%d nonfinite_skips=%d",
            p.epoch,
            p.loss,
            p.lr,
            p.global_samples_per_second,
            p.last_group_size,
            p.local_steps,
            p.epoch_samples,
            self.opt.rounds.get("ok", 0),
            self.opt.rounds.get("failed", 0),
            p.nonfinite_skips,
        )

    def shutdown(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        self.opt.shutdown()
