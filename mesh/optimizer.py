"""The run's optimizer: hivemind.Optimizer with the mesh's averagers, and what builds it from a run record.

Each local step hands the gradient to hivemind, which accumulates toward the run's global ``target_batch_size``.
When the swarm has accumulated that many samples, the peers that are ready form groups through the DHT, all-reduce
their gradients, and every member steps: one epoch. A failed round degrades to the local gradient and is counted.
The session (mesh/session.py) drives it, and drops a non-finite gradient before hivemind ever sees it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Iterator

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression, Uniform8BitQuantization
from hivemind.utils import get_dht_time

from mesh import dataplane, epochplan, metrics
from mesh.admission import Admission
from mesh.averager import MeshGradientAverager, MeshStateAverager
from mesh.diloco import PseudoGradientAverager, outer_optimizer_factory, outer_statistics
from mesh.errors import ConfigError, RunError
from mesh.planeround import PlaneRound
from mesh.records import RunRecord
from mesh.rounds import wire_bytes
from mesh.schedule import clip_before_step, scheduler_factory
from mesh.tasks.base import Batch
from mesh.tracker import MeshProgressTracker

logger = logging.getLogger(__name__)

# Tensors smaller than this are sent as fp16 even in 8-bit mode: quantizing a bias of a few values costs more
# accuracy than it saves bytes.
EIGHT_BIT_MIN_SIZE = 2**12
PROGRESS_REPORT_PERIOD = 1.0  # seconds between a peer's progress reports to the DHT (hivemind: every local step)
NEVER = sys.maxsize  # an average_state_every that no epoch reaches
PROGRESS_EXPIRATION = 10.0  # seconds a progress report counts (hivemind: 60); idle peers re-report at half that
LEAVE_WAIT = 5.0  # seconds a leaving member of a standing group waits to tag along in the group's next round
CATCH_UP_WAIT = 5.0  # seconds a peer whose download was an epoch behind the swarm's waits for one that is not
CATCH_UP_PAUSE = 0.5  # seconds between those downloads
STATE_AVERAGER_LOGGER = "hivemind.optim.state_averager"  # TrainingStateAverager's (tests/unit/test_hivemind_api.py)
MIN_FINAL_ATTEMPT = 1.0  # seconds: a final parameter round (MeshOptimizer.finish) is not tried in less


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


def run_optimizer_factory(record: RunRecord, own: Callable[[Any], torch.optim.Optimizer] | None) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer the run steps: this peer's ``own`` factory (the task's, or ``peer.optimizer(factory)``'s) when
    the record says ``optimizer=task``, else the built-in one the record names; clipped before every step under
    ``--clip-grad-norm`` either way."""
    if record.optimizer != "task":
        make = make_optimizer_factory(record.optimizer, record.lr, record.weight_decay)
    elif own is not None:
        make = own
    else:
        raise RunError(
            f"run {record.run_id!r} steps its peers' own optimizer (optimizer=task), but this peer brings none: "
            "give the task a make_optimizer (or peer.optimizer a factory)"
        )
    clip = record.clip_grad_norm
    return (lambda params: clip_before_step(make(params), clip)) if clip is not None else make


def optimizer_statistics(make: Callable[[Any], torch.optim.Optimizer]) -> tuple[str, ...]:
    """The per-parameter state tensors the optimizer ``make`` builds keeps (Adam's ``exp_avg`` and ``exp_avg_sq``,
    SGD's ``momentum_buffer``), found by one step of a probe. Parameter rounds average them with the parameters:
    members whose parameters a round made equal but whose moments differ (one stepped alone in a failed or
    local-only round, or took another member's state) step apart again from the next averaged gradient on (seen in
    CI with AdamW: every round ok to the end, the members' parameters still different)."""
    probe = torch.nn.Parameter(torch.zeros(2))
    try:
        optimizer = make([probe])
        probe.grad = torch.zeros_like(probe)
        optimizer.step()
    except Exception as err:  # noqa: BLE001 - the user's factory: without a probe, parameters only
        logger.debug("optimizer statistics not probed (%s): parameter rounds average parameters only", err)
        return ()
    state = optimizer.state.get(probe, {})
    return tuple(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == probe.shape))


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
    return dataplane.finite([p.grad for p in model.parameters() if p.grad is not None])


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
        # parameter rounds repair drift, and leave members bit-identical (ExactRoundMixin); with local updates
        # they are the averaging itself, every epoch, in float32
        self.exact_state_rounds = not kwargs.get("use_local_updates", False)
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
            exact_rounds=self.exact_state_rounds,
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
            state_group = self.state_averager.take_round_size()
            if state_group is not None and state_group >= live:  # this epoch's parameter round had everyone in it
                self.grad_averager.last_round_complete = True
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

    def finish(self, timeout: float, stop: threading.Event | None = None) -> dict[str, int] | None:
        """The run's end for this peer (its ``max_epochs``). When its last epoch's rounds did not have every live
        peer in them (the gradient round failed or missed a member, and no parameter round made up for it), members
        may hold different parameters and no later round would bring them together: average parameters and
        optimizer statistics with every live peer once more, again while the group was short, for at most
        ``timeout`` seconds (``stop``, SIGTERM, ends it early). A member still behind joins through its own
        epoch's parameter round (its gradient round, without the finished members, fails, and hivemind then
        averages parameters in the same averager) or through its own final round. Returns the last final round's
        ``{"wanted": n, "group": m}`` (m 0: it failed), or None when none was needed."""
        averager = self.grad_averager
        if averager is None or averager.last_round_complete:
            return None
        deadline = time.monotonic() + timeout
        matchmaking = float(self.state_averager.matchmaking_kwargs["min_matchmaking_time"])
        result = None
        while time.monotonic() < deadline - MIN_FINAL_ATTEMPT and not (stop is not None and stop.is_set()):
            others = self.tracker.others_epochs()  # a peer that left gracefully has withdrawn its record
            if not others:
                break
            wanted = len(others) + 1
            attempt = min(deadline - time.monotonic(), self.averaging_timeout)
            self.state_averager.set_target_group_size(wanted)
            # the round starts within the attempt: hivemind asserts that its start (by default now + the
            # matchmaking time) is before its deadline, which a last, shorter attempt would not meet
            start = get_dht_time() + min(matchmaking, attempt / 2)
            control = self.state_averager.schedule_step(scheduled_time=start, gather=self.local_epoch, timeout=attempt)
            watcher = threading.Thread(target=_cancel_on_stop, args=(control, stop, attempt), daemon=True)
            watcher.start()
            self.state_averager.step(averaging_round=True, averaging_control=control, averaging_opts={"timeout": attempt})
            if not control.done():  # timed out waiting: no round of this attempt may go on writing parameters
                control.cancel()
            group = self.state_averager.take_round_size() or 0  # 0: failed (hivemind logged why)
            result = {"wanted": wanted, "group": group}
            logger.info("final parameter round epoch=%d group=%d of %d", self.local_epoch, group, wanted)
            if group >= wanted:
                break
        return result

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
        self.state_averager.loaded_epoch = None
        super().load_state_from_peers(**kwargs)
        loaded = self.state_averager.loaded_epoch
        if loaded is not None and loaded < self.local_epoch:
            loaded = self._load_the_swarms_epoch(loaded)
        self.sync_scheduler()
        self.share_averaged_statistics()
        # applied: TrainingStateAverager refuses a state behind the local epoch (the epoch may not change: a peer
        # that ended its round a step ahead of its group's epoch downloads that same epoch)
        if loaded is not None and loaded >= before:
            if getattr(self, "grad_averager", None) is not None:
                # the donor's parameters need not be those of the group this peer meets next (after a join and a
                # leave at once, members stayed apart to the end in CI: every later round ok, none averaged them)
                self.grad_averager.resync_wanted = True
                self.grad_averager.last_round_complete = False  # at the run's end, average with the others once more
            self.state_downloads += 1
            metrics.state_downloads.labels(self.run_label).inc()
            metrics.state_download_duration.labels(self.run_label).observe(time.perf_counter() - started)
            logger.info("loaded state from peers epoch=%d seconds=%.2f", self.local_epoch, time.perf_counter() - started)
        else:
            # hivemind returns without state when no peer could serve it (e.g. the swarm's progress records outlive
            # peers that just left); back off instead of retrying in a tight loop
            logger.warning("no peer could serve the newest state (epoch %d); retrying", self.tracker.global_epoch)
            time.sleep(1.0)

    def _load_the_swarms_epoch(self, loaded: int) -> int:
        """hivemind labels a downloaded state one epoch behind the swarm's with the swarm's epoch ("catching up":
        the donor had not finished its step yet). The parameters are then one step short of the others' while this
        peer counts the same epochs: its next gradient is not seen as stale, and every later step is applied to
        parameters a step behind until a parameter round dilutes the gap into everyone's (seen in the admission
        test: a late joiner took epoch 8 labelled 9). So download again while the donors finish their step, for at
        most ``CATCH_UP_WAIT`` seconds; a state of the swarm's epoch (or newer) replaces the short one, else
        hivemind's label stands. Returns the epoch of the state now held."""
        wanted, deadline = self.local_epoch, time.monotonic() + CATCH_UP_WAIT
        self.catch_ups += 1
        while time.monotonic() < deadline:
            time.sleep(CATCH_UP_PAUSE)
            self.state_averager.loaded_epoch = None
            # applied only if not behind the local (relabelled) epoch: TrainingStateAverager refuses older states,
            # with a warning each time, which here is the expected answer until the donor's step is done
            with _without(STATE_AVERAGER_LOGGER, "Cowardly refusing"):
                self.state_averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
            again = self.state_averager.loaded_epoch
            if again is not None and again >= wanted:
                self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
                if self.grad_averager is not None:
                    self.grad_averager.reset_accumulated_grads_()
                logger.info("caught up with the swarm's epoch %d: took a state of epoch %d", wanted, again)
                return again
        self.catch_ups_short += 1
        logger.info("no donor served the swarm's epoch %d within %.0fs: keeping the state of epoch %d", wanted, CATCH_UP_WAIT, loaded)
        return loaded

    catch_ups = 0  # downloads hivemind relabelled with the swarm's epoch (one epoch newer than the state)
    catch_ups_short = 0  # of those, where no donor served the swarm's epoch in time: parameters a step short

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.sync_scheduler()

    def sync_scheduler(self) -> None:
        """Step the lr scheduler up to the local epoch. hivemind does so after an epoch's step and inside a state
        download, but not where it then sets the epoch itself: ``Optimizer.load_state_from_peers`` catching up to
        the swarm's epoch, ``Optimizer.load_state_dict`` (a checkpoint). The lr then lagged one epoch behind the
        run's until the next epoch (seen in CI: a peer stepped epoch 12 with epoch 11's lr after a download)."""
        self.state_averager._update_scheduler()

    state_downloads: int = 0


@contextlib.contextmanager
def _without(logger_name: str, text: str) -> Iterator[None]:
    """Drop the records of logger ``logger_name`` that contain ``text`` while inside."""
    target = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def _cancel_on_stop(control: Any, stop: threading.Event | None, timeout: float) -> None:
    """Cancel a final parameter round (:meth:`MeshOptimizer.finish`) when ``stop`` is set within ``timeout``: a
    SIGTERM then ends the wait for the group at once, not after the attempt's timeout."""
    if stop is not None and stop.wait(timeout) and not control.done():
        control.cancel()


def make_run_optimizer(
    dht: hivemind.DHT,
    record: RunRecord,
    params: Any,
    *,
    own_optimizer: Callable[[Any], torch.optim.Optimizer] | None,
    own_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    admission: Admission,
    client_mode: bool = False,
    data_plane_host: str | None = None,
    nccl: torch.device | None = None,
) -> tuple[MeshOptimizer, torch.optim.Optimizer | None]:
    """The hivemind optimizer that steps ``params`` (a model's parameters or parameter groups) in ``record``'s run,
    and, under DiLoCo, the inner optimizer that steps them every local step (else None)."""
    diloco = record.averaging == "diloco"
    run_optimizer = run_optimizer_factory(record, own_optimizer)
    # DiLoCo: the run's optimizer steps the model every local step (inner); hivemind's steps the outer one
    inner = run_optimizer(params) if diloco else None
    gradient_averager = partial(
        PseudoGradientAverager if diloco else MeshGradientAverager,
        run_id=record.run_id,
        compression_name=record.compression,
        data_plane_host=data_plane_host,
        nccl_device=nccl,
        aggregation=record.aggregation,
        admission=admission,
    )
    opt = MeshOptimizer(
        dht=dht,
        admission=admission,
        params=params,
        optimizer=outer_optimizer_factory(record.outer_lr, record.outer_momentum) if diloco else run_optimizer,
        # the lr by global epoch (mesh/schedule.py): hivemind steps it with the run's epoch, a late joiner's too
        scheduler=None if diloco else own_scheduler or scheduler_factory(record.lr_schedule, record.warmup_epochs, record.total_epochs),
        batch_size_per_step=record.batch_size,
        target_batch_size=record.inner_steps * record.batch_size if diloco else record.target_batch_size,
        inner_steps=record.inner_steps if diloco else None,
        # DiLoCo's outer state is the optimizer's (offloaded) parameters and its momentum: a parameter round
        # averages both, so members that stepped apart agree on all of it again
        offload_optimizer=True if diloco else None,
        average_opt_statistics=outer_statistics(record.outer_momentum) if diloco else optimizer_statistics(run_optimizer),
        matchmaking_time=record.matchmaking_time,
        averaging_timeout=record.averaging_timeout,
        load_state_timeout=max(60.0, record.averaging_timeout),
        use_local_updates=record.averaging == "local",
        grad_averager_factory=None if record.averaging == "local" else gradient_averager,
        grad_compression=make_compression(record.compression),
        # parameter rounds exist to make members agree again: in fp32, whatever the gradients' wire format.
        # hivemind's all-reduce keeps each member's own part of the mean uncompressed and sends the others'
        # compressed, so in fp16 (or 8 bits) members ended a parameter round with different parameters, and
        # kept them apart from then on (DiLoCo's kill-and-join test saw every member's digest differ)
        state_averaging_compression=NoCompression(),
        # local updates: parameters are all there is to average, every epoch
        state_every=1 if record.averaging == "local" else record.average_state_every,
        # a peer that stopped reporting (killed, stopped, partitioned) leaves the live count, and so the size a
        # group waits for, this many seconds after its last report.
        # hivemind re-reads the swarm's progress at most every 10 s by default, sooner only when its (first,
        # start-up-slow) estimate says the epoch ends sooner; with epochs of a second or two a peer then counts
        # only its own samples and every epoch grows to peers x target. Re-read at least every 2 s, and at the
        # start of every epoch (the session's epoch handling).
        tracker_opts={"metadata_expiration": PROGRESS_EXPIRATION, "max_refresh_period": 2.0, "report_period": PROGRESS_REPORT_PERIOD},
        client_mode=client_mode,
        verbose=False,
    )
    if opt.grad_averager is not None:  # the same shapes as the model's parameters
        opt.grad_averager.gradient_wire_bytes = wire_bytes(opt.optimized_parameters, record.compression, EIGHT_BIT_MIN_SIZE)
    return opt, inner
