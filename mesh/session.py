"""A peer's session in a run: the library API, and what ``mesh peer`` is built on (one trainer, not two).

    import mesh

    with mesh.join(run="lm-1", join=[ADDR], batch_size=32, target_batch_size=4096) as peer:
        model = peer.model(MyModel())                      # built after join(): the same start on every peer
        opt = peer.optimizer(lambda params: torch.optim.AdamW(params, lr=3e-4), clip_grad_norm=1.0)
        for batch in peer.batches(loader):                 # any iterable; moved to the device; resumable
            loss = model(batch).loss
            loss.backward()
            opt.step()                                     # NaN guard, then hivemind (which may end an epoch)
            opt.zero_grad()
            peer.report(loss=loss)                         # no device sync per step

``join`` starts the DHT node (and asks the coordinator, when one is given); ``model`` checks the model against the
run; ``optimizer`` joins the run (creating it when nobody has), builds hivemind's optimizer with the mesh's
averagers, resumes from the checkpoint, and starts the threads (record keeper, heartbeats, metrics server);
``batches`` ends on SIGTERM/SIGINT or at ``max_epochs``, and leaving the ``with`` block leaves the run within
``shutdown_timeout``: the checkpoint, the status file, the optimizer's helpers and the DHT, in that order.

Order matters: the DHT and the optimizer fork helper processes, so they start before any thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import threading
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from mesh import atomicfile, checkpoint, dataplane, httpserve, lifecycle, logs, metrics
from mesh.admission import Admission
from mesh.averager import parameter_digest
from mesh.config import PeerConfig, RunDefaults, describe, resolve
from mesh.coordinator_client import Coordinator
from mesh.data import Batches
from mesh.dht import check_port_free, data_plane_host, start_dht, visible_maddrs
from mesh.errors import ConfigError, JoinError, RunError
from mesh.optimizer import MeshOptimizer, gradients_finite, make_run_optimizer, nccl_device, pick_device, to_device
from mesh.records import PeerPresence, RunRecord, announce_peer, fetch_peers, fetch_run, fingerprint
from mesh.reporting import Reporter
from mesh.runs import RecordKeeper, check_joined, log_joined, new_record, publish_new, starting_presence, warn_if_open
from mesh.trackers import Trackers, open_trackers
from mesh.wirebytes import TcpTraffic

logger = logging.getLogger(__name__)

# the run settings a coordinator's run carries (api.models.Hyperparameters, the same names), read from it and reported
# to it: every run setting, so that a new one cannot be left out
HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(RunDefaults))
NONFINITE_STREAK = 3  # non-finite gradients in a row after which the parameters themselves are checked


@dataclass
class Progress:
    """What the peer tells people (logs, status file, heartbeats, ``mesh up``)."""

    epoch: int = 0
    local_steps: int = 0
    samples: int = 0
    epoch_samples: int = 0  # this peer's samples in the last epoch
    loss: float = float("nan")
    lr: float = float("nan")  # the optimizer's, by the run's schedule (the same on every peer at one epoch)
    eval_loss: float = float("nan")  # on held-out data, at the last evaluation (--eval-every, or peer.report)
    eval_epoch: int = -1  # the epoch of that evaluation
    global_samples_per_second: float = 0.0
    last_group_size: int = 0
    rounds: dict[str, int] = field(default_factory=dict)
    nonfinite_skips: int = 0
    parameter_recoveries: int = 0  # times this peer's parameters were not finite and it took the run's state instead
    # times its state was not finite and it kept it out of a parameter round (taking the others' mean) or a download
    nonfinite_state_withheld: int = 0
    state_downloads: int = 0
    short_state_downloads: int = 0  # downloads an epoch behind the swarm's that no newer one replaced in time
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
    behind_rounds: int = 0  # rounds joined behind the group's epoch: this peer's stale gradient left out
    refused: dict[str, int] = field(default_factory=dict)  # admission refusals by reason (mesh/admission.py)
    # at max_epochs, the parameter round with every live peer after a last round without them all (MeshOptimizer.finish):
    # {"wanted": members, "group": those in it}; None when none was needed
    final_round: dict[str, Any] | None = None  # {"error": why} when it raised
    _epoch_first_step: int = 0
    _epoch_losses: list[Any] = field(default_factory=list)  # reported losses (tensors: summed once an epoch)
    _epoch_started: float = field(default_factory=time.monotonic)
    _epoch_first_sample: int = 0

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        public = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return {**public, **extra, "time": time.time()}


# averager counters brought into this process's metrics and the progress every epoch
_AVERAGER_COUNTERS = (
    ("data_plane_builds", metrics.data_plane_builds),
    ("data_plane_fallbacks", metrics.data_plane_fallbacks),
    ("standing_rounds", metrics.standing_rounds),
    ("nccl_rounds", metrics.nccl_rounds),
    ("state_rounds_skipped", metrics.state_rounds_skipped),
    ("clipped_outliers", metrics.clipped_outliers),
    ("unbounded_steps_skipped", metrics.unbounded_steps_skipped),
    ("behind_rounds", metrics.behind_rounds),
)


def join(
    run: str | None = None, join: Iterable[str] | str = (), *, task: str | None = None, handle_signals: bool = True, **settings: Any
) -> "Peer":
    """Join run ``run`` through the DHT nodes at ``join`` (multiaddrs; none: start a new mesh) and return the
    started :class:`Peer`; use it as a context manager, which leaves the run on exit.

    ``settings`` are ``mesh peer``'s, by their Python names (``target_batch_size=4096``, ``run_secret=...``,
    ``checkpoint_dir=...``, ``device="cuda:1"``); unset ones come from ``MESH_*`` environment variables, then the
    defaults, as for the CLI. ``task`` names what this script trains in the run's record (default: the script's
    name); peers of a run must give the same one. ``handle_signals``: SIGTERM/SIGINT end :meth:`Peer.batches`
    (a second one exits at once). A wrong setting raises :class:`mesh.errors.ConfigError` with one line."""
    flags = {**settings, "run": run, "join": (join,) if isinstance(join, str) else tuple(join)}
    flags["task"] = task or Path(sys.argv[0] or "own").stem or "own"
    unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(PeerConfig)})
    if unknown:
        raise ConfigError(f"mesh.join: unknown setting(s) {', '.join(unknown)} (the names are mesh peer's flags, with _)")
    return Peer(resolve(PeerConfig, flags), handle_signals=handle_signals).start()


class PeerOptimizer:
    """What :meth:`Peer.optimizer` returns: ``step()`` and ``zero_grad()`` as on a torch optimizer, over the run's
    hivemind optimizer (the rest of its attributes, ``param_groups`` included, read through)."""

    def __init__(self, peer: "Peer", opt: MeshOptimizer, inner: torch.optim.Optimizer | None) -> None:
        self._peer, self._opt, self._inner = peer, opt, inner

    def step(self, batch_size: int | None = None) -> bool:
        """Hand this step's gradient to the run (``batch_size`` samples: the last batch's, else the run's); False
        when it was not finite and was dropped instead (never sent, never applied)."""
        return self._peer._step(batch_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._opt, name)


class Peer:
    """One peer's membership of a run (see the module's docstring); made by :func:`join`, or by ``mesh peer``."""

    def __init__(self, config: PeerConfig, *, handle_signals: bool = True) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.stop = threading.Event()
        self.progress = Progress()
        self.dht: Any = None
        self.record: RunRecord | None = None  # the run's, once known (start() reads it when the run exists)
        self.coordinator: Coordinator | None = None
        self.opt: MeshOptimizer | None = None
        self.inner_opt: torch.optim.Optimizer | None = None
        self._model: torch.nn.Module | None = None
        self._evaluate: Callable[[torch.nn.Module], float] | None = None
        self._batches: Batches | None = None
        self._data_state: dict | None = None  # a checkpoint's data position, for the batches not yet made
        self._last_batch_size: int | None = None
        self._nonfinite_streak = 0  # non-finite gradients in a row
        self._step_started = time.perf_counter()
        self._epoch_times: list[float] = []
        self._threads: list[tuple[str, Callable[[], None]]] = []
        self.trackers: Trackers | None = None
        self.reason = "stopped"
        self.exit_code = 0
        self.state = "starting"
        self.gpu_name: str | None = None

    # -- joining

    def start(self) -> "Peer":
        """Start the DHT node and read the run's record (when the run exists); seed torch with the run's seed, so
        that models built next start from the same parameters on every peer."""
        config = self.config
        if self.handle_signals:
            self.stop = lifecycle.install_stop_handlers(self.stop)
        logger.info("peer config %s", describe(config))
        metrics.init_build_info("peer")
        # cheap checks first, so a typo costs no DHT start-up
        if config.checkpoint_dir is not None:
            checkpoint.ensure_writable(config.checkpoint_dir)
        self.device = pick_device(config.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
        if config.metrics_port:
            check_port_free(config.host, config.metrics_port)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config = self._ask_coordinator(config)
        self.admission = Admission(config.run, config.run_secret)  # before any helper process forks: they count refusals
        self.dht = start_dht(config)
        try:
            self.peer_id = str(self.dht.peer_id)
            logs.set_context(peer_id=self.peer_id, run=config.run)
            logger.info("dht joined peer_id=%s addrs=%s", self.peer_id, ",".join(visible_maddrs(self.dht)) or "-")
            warn_if_open(self.admission)
            self.record = self._find_record()
            torch.manual_seed(self.seed)  # every peer of the run starts from the same parameters
        except BaseException:
            self.leave()
            raise
        return self

    def _find_record(self) -> RunRecord | None:
        """The run's record, or None when the run is new. A freshly joined node may not see a record at once, so
        a peer that can only join, or one that sees live peers of the run, looks a few more times, a second apart.
        A peer with a task that sees neither creates the run at once: those retries cost every new run's first
        peers 2 s, and an open run's record has one subkey, so a peer that missed a live run's record would have
        replaced it with its own."""
        config, admission = self.config, self.admission
        record = fetch_run(self.dht, config.run, attempts=1, admission=admission)
        if record is None and (not config.task or fetch_peers(self.dht, config.run, admission=admission)):
            record = fetch_run(self.dht, config.run, attempts=3, admission=admission)
        return record

    def _ask_coordinator(self, config: PeerConfig) -> PeerConfig:
        """With ``--coordinator``: the run it picks (``--run auto``), its bootstrap addresses (without ``--join``),
        a run's settings when it created the run, and the run's secret when it hands one out."""
        if not config.coordinator:
            if config.run == "auto":
                raise ConfigError("--run auto needs --coordinator URL: the coordinator knows which run most needs peers")
            return config
        coordinator = self.coordinator = Coordinator(config.coordinator, config.api_token)
        if config.run == "auto":
            config = dataclasses.replace(config, run=coordinator.pick_run())
            logger.info("picked run run=%s", config.run)
        if not config.join:
            config = dataclasses.replace(config, join=coordinator.bootstrap_addrs())
        run = None
        try:
            run = coordinator.run_config(config.run)
        except JoinError as err:  # with --join the mesh does not need the coordinator: train, report later
            logger.warning("%s; training without it for now", err)
        if config.run_secret is None:
            # a coordinator with --run-secret-key hands the run's secret to peers holding its API token
            try:
                secret = coordinator.run_secret(config.run)
            except JoinError as err:
                logger.warning("%s; no run secret from the coordinator", err)
                secret = None
            if secret is not None:
                config = dataclasses.replace(config, run_secret=secret)
                logger.info("run secret from the coordinator run=%s", config.run)
        if config.task is None and run is not None and run.get("task") not in (None, "unknown"):
            # a run created through the coordinator's API: this peer can create its DHT record from it
            config = dataclasses.replace(config, task=run["task"], **coordinator_hyperparameters(run))
        return config

    @property
    def seed(self) -> int:
        """The run's seed: models are built under it, so every peer starts from the same parameters."""
        return self.record.seed if self.record is not None else self.config.seed

    @property
    def data_seed(self) -> int:
        """This peer's own seed for its data (from its peer id: stable under a fixed ``--identity``)."""
        return zlib.crc32(self.peer_id.encode())

    @property
    def task_spec(self) -> str:
        """The task the run trains: its record's, else this peer's (``--task``); one line when neither exists."""
        if self.record is not None:
            return self.record.task
        if self.config.task is None:
            raise RunError(
                f"run {self.config.run!r} does not exist in this mesh (no live peer publishes it); "
                "pass --task NAME to create it, or check the run id"
            )
        return self.config.task

    def model(self, module: torch.nn.Module, *, evaluate: Callable[[torch.nn.Module], float] | None = None) -> torch.nn.Module:
        """Train ``module`` in the run: moved to the peer's device and checked against the run's parameter
        fingerprint. Its state is replaced by the run's (a checkpoint, or the peers') when :meth:`optimizer`
        finds this peer behind. ``evaluate(model) -> held-out loss`` runs every ``eval_every`` epochs."""
        if self._model is not None:
            raise ConfigError("peer.model() was called already: a peer trains one model")
        module = module.to(self.device)
        if self.record is not None:
            check_joined(self.record, self.config.task, fingerprint(module))
        self._model, self._evaluate = module, evaluate
        return module

    # -- the optimizer: joins (or creates) the run and starts training

    def optimizer(
        self,
        factory: Callable[[Any], torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
        *,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        clip_grad_norm: float | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> PeerOptimizer:
        """The run's optimizer over the model's parameters (or ``param_groups``).

        ``factory(params) -> torch optimizer`` (or an optimizer, whose class and settings are taken) is stepped
        on the run's averaged gradient; without one, the run's built-in ``--optimizer``/``--lr``. ``scheduler(opt)``
        is stepped per *global* epoch, so a late joiner has the run's lr. ``clip_grad_norm`` clips the averaged
        gradient. All three go in the run's record when this peer creates the run, and must match it when the run
        exists. ``defaults``: hyperparameters suggested for a run this peer creates (a task's)."""
        if self._model is None:
            raise ConfigError("call peer.model(module) before peer.optimizer(...)")
        if self.opt is not None:
            raise ConfigError("peer.optimizer() was called already: a peer steps one optimizer")
        if isinstance(factory, torch.optim.Optimizer):
            factory = _factory_of(factory)
        if clip_grad_norm is not None:
            self.config = dataclasses.replace(self.config, clip_grad_norm=float(clip_grad_norm))
        record = self.record = self._settle_record(factory is not None, scheduler is not None, clip_grad_norm, defaults or {})
        # announced at once: a protected run's peers serve state only to peers with a signed presence
        announce_peer(self.dht, self.peer_id, starting_presence(record.run_id, str(self.device)), admission=self.admission)
        config = self.config
        self.opt, self.inner_opt = make_run_optimizer(
            self.dht,
            record,
            param_groups if param_groups is not None else list(self._model.parameters()),
            own_optimizer=factory,
            own_scheduler=scheduler,
            admission=self.admission,
            client_mode=config.client_mode,
            data_plane_host=None
            if config.data_plane == "hivemind"
            else data_plane_host(config.data_plane_host, config.host, config.announce, self.dht),
            nccl=nccl_device(self.device) if config.data_plane == "nccl" else None,
        )
        self.gpu_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        metrics.init_peer(record.run_id, str(self.device), self.gpu_name)
        self.traffic = TcpTraffic()
        self._resume()
        # hivemind's averagers set SIGINT to "ignore" in this process as they start (DecentralizedAverager.
        # run_in_background), so Ctrl-C did nothing: take the signals back
        if self.handle_signals:
            lifecycle.install_stop_handlers(self.stop)
        self._start_threads()
        logger.info(
            "training run=%s task=%s device=%s batch_size=%d target_batch_size=%d compression=%s",
            record.run_id,
            record.task,
            self.device,
            record.batch_size,
            record.target_batch_size,
            record.compression,
        )
        return PeerOptimizer(self, self.opt, self.inner_opt)

    def _settle_record(self, own_optimizer: bool, own_scheduler: bool, clip: float | None, suggested: dict) -> RunRecord:
        """The run's record: the one start() read (checked against what this peer brings), else a new one."""
        assert self._model is not None
        config, model_fingerprint = self.config, fingerprint(self._model)
        record = self.record
        if record is None:
            record = publish_new(
                self.dht,
                new_record(
                    config.run,
                    self.task_spec,
                    model_fingerprint,
                    config,
                    suggested=suggested,
                    own_optimizer=own_optimizer,
                    own_scheduler=own_scheduler,
                ),
                self.admission,
            )
        check_joined(record, config.task, model_fingerprint)
        if own_optimizer and record.optimizer != "task":
            raise RunError(
                f"run {record.run_id!r} steps the built-in optimizer {record.optimizer} (lr {record.lr:g}), not this "
                "peer's own: drop the optimizer factory, or pick another run"
            )
        if clip is not None and clip != record.clip_grad_norm:
            raise RunError(f"run {record.run_id!r} clips gradients at {record.clip_grad_norm}, not {clip:g}: drop clip_grad_norm")
        log_joined(record, self.admission)
        return record

    def _start_threads(self) -> None:
        assert self.record is not None and self.opt is not None
        config, record = self.config, self.record
        if config.tracker:
            self.trackers = Trackers(open_trackers(config.tracker, _tracker_dir(config), record.run_id, self.peer_id))
        keeper = RecordKeeper(self.dht, record, self.presence, self.admission)
        keeper.start()
        self._threads.append(("record keeper", keeper.stop))
        if self.coordinator is not None:
            addrs = visible_maddrs(self.dht)[:8]
            reporter = Reporter(
                self.coordinator,
                self.peer_id,
                lambda: self.heartbeat(addrs),
                on_run_ended=lambda status: self.stop.set(),
                interval=config.heartbeat_interval,
            )
            reporter.start()
            self._threads.insert(0, ("coordinator", reporter.stop))
        if config.metrics_port is not None:
            opt = self.opt
            httpserve.serve(config.host, config.metrics_port, lambda: {"status": "ok", "run_id": record.run_id, "epoch": opt.local_epoch})

    # -- the loop's parts

    def batches(self, source: Any, *, device: bool = True) -> Iterator[Any]:
        """The batches of ``source`` (any iterable: a DataLoader is iterated again every pass, ``set_epoch``
        first), moved to the peer's device (unless ``device=False``), until the peer is asked to leave (SIGTERM,
        the coordinator) or reaches ``max_epochs``. Where this peer's data stands goes into its checkpoints, and a
        restarted peer goes on from there."""
        if self._batches is not None:
            raise ConfigError("peer.batches() was called already: a peer draws one stream of batches")
        self._batches = Batches(source, self.task_spec)
        if self._data_state is not None:
            self._batches.load_state_dict(self._data_state)
            self._data_state = None
        return self._iterate(self._batches, device)

    def _iterate(self, batches: Batches, device: bool) -> Iterator[Any]:
        if self.opt is None:
            raise ConfigError("call peer.optimizer(...) before drawing peer.batches(...)")
        config, opt = self.config, self.opt
        if config.min_peers > 1:
            self.write_status(state="waiting")
            self._wait_for_announcements(config.min_peers, config.min_peers_timeout)
        self.write_status(state="training")
        live = sys.stderr.isatty()
        last_epoch, next_line, next_draw = self.progress.epoch, time.monotonic() + config.log_every, 0.0
        first = True
        try:
            while not self.stop.is_set():
                if config.max_epochs is not None and opt.local_epoch >= config.max_epochs:
                    self.reason = "max_epochs"
                    return
                batch = next(batches)
                self._last_batch_size = _batch_size(batch)
                self._step_started = time.perf_counter()
                yield to_device(batch, self.device) if device else batch
                if first and config.min_peers > 1:  # the first step has reported: wait until the tracker counts all
                    self._wait_for_tracker(config.min_peers, config.min_peers_timeout)
                first = False
                now = time.monotonic()
                if live and now >= next_draw:
                    next_draw = now + 0.5
                    sys.stderr.write("\r\x1b[2K" + self.status_line())
                    sys.stderr.flush()
                elif not live and (self.progress.epoch != last_epoch or now >= next_line):
                    last_epoch, next_line = self.progress.epoch, now + config.log_every
                    self.log_progress()
            self.reason = "stopped"
        finally:
            if live:
                sys.stderr.write("\r\x1b[2K" + self.status_line() + "\n")

    def _step(self, batch_size: int | None) -> bool:
        """One local step's gradient into the run (see :meth:`PeerOptimizer.step`)."""
        assert self.opt is not None and self.record is not None and self._model is not None
        p, run = self.progress, self.record.run_id
        p.local_steps += 1
        if not gradients_finite(self._model):
            # never hand a NaN/inf to hivemind: it would be sent to the group and applied by everyone
            self.opt.zero_grad()
            p.nonfinite_skips += 1
            metrics.nonfinite_skips.labels(run).inc()
            logger.warning("dropped non-finite gradient step=%d epoch=%d", p.local_steps, self.opt.local_epoch)
            self._nonfinite_streak += 1
            if self._nonfinite_streak % NONFINITE_STREAK == 0:
                self._recover_parameters()
            return False
        self._nonfinite_streak = 0
        size = batch_size or self._last_batch_size or self.record.batch_size
        if self.config.min_step_time is not None:  # a testing aid: a step as slow as a real model's
            time.sleep(max(0.0, self.config.min_step_time - (time.perf_counter() - self._step_started)))
        if self.inner_opt is not None:
            self.inner_opt.step()
        self.opt.step(batch_size=size)
        p.samples += size
        metrics.steps.labels(run).inc()
        metrics.samples.labels(run).inc(size)
        metrics.step_duration.labels(run).observe(time.perf_counter() - self._step_started)
        if self.opt.local_epoch != p.epoch:
            self._on_new_epoch()
        return True

    def _recover_parameters(self) -> None:
        """After ``NONFINITE_STREAK`` non-finite gradients in a row: if the parameters themselves are not finite, no
        gradient will be again, and the peer would drop every step for good. Nothing averaged brings a NaN (each
        round's mean is checked), so this is local (a fault, a divergence): take the run's state from the live
        peers, or, when none has a finite one, end with one line (the run diverged); the last checkpoint is kept."""
        assert self.opt is not None and self.record is not None and self._model is not None
        if self.parameters_finite():
            return
        opt, p = self.opt, self.progress
        logger.warning("parameters are not finite step=%d epoch=%d; taking the run's state from peers", p.local_steps, opt.local_epoch)
        # its state stays on offer meanwhile: hivemind ranks donors by epoch, and this one's stopped advancing (a
        # joiner that still takes it gets here too); withdrawing it is a DHT store from the averager's process, which
        # raced with that process's exit when the peer then ended (a traceback from the DHT process, a hung leave)
        opt.load_state_from_peers()
        opt.zero_grad()
        if not self.parameters_finite():
            raise RunError(
                f"this peer's parameters are not finite (since local step {p.local_steps - self._nonfinite_streak + 1} or "
                f"before) and no live peer of run {self.record.run_id!r} served a finite state: the run diverged; "
                "start it again from its last checkpoint with a lower --lr or with --clip-grad-norm"
            )
        p.parameter_recoveries += 1
        metrics.parameter_recoveries.labels(self.record.run_id).inc()
        logger.info("parameters finite again: took the run's state epoch=%d", opt.local_epoch)

    def parameters_finite(self) -> bool:
        return self._model is not None and dataplane.finite([param.detach() for param in self._model.parameters()])

    def report(self, loss: Any = None, *, eval_loss: float | None = None) -> None:
        """This step's training loss (a tensor is kept as it is, and averaged once an epoch: no device sync per
        step), and a held-out loss when the loop evaluated (reported with the current epoch)."""
        if loss is not None:
            self.progress._epoch_losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
        if eval_loss is not None:
            self._record_eval(float(eval_loss), self.progress.epoch)

    @property
    def epoch(self) -> int:
        """The run's epoch as this peer has it."""
        return self.opt.local_epoch if self.opt is not None else 0

    @property
    def stopping(self) -> bool:
        """Whether the peer was asked to leave (for a loop that does not draw :meth:`batches`)."""
        return self.stop.is_set()

    def _on_new_epoch(self) -> None:
        assert self.opt is not None and self.record is not None
        opt, p, run = self.opt, self.progress, self.record.run_id
        if not opt.tracker.has_plan(opt.local_epoch):  # a planned epoch ends by the plan, not the estimate
            opt.tracker.refresh()
        now = time.monotonic()
        # before the progress shows the new epoch: a heartbeat that reports it reports its lr and evaluation too
        p.lr = float(opt.param_groups[0]["lr"])
        metrics.lr.labels(run).set(p.lr)
        if self._evaluate is not None and self.config.eval_every and opt.local_epoch % self.config.eval_every == 0:
            self.evaluate(opt.local_epoch)
        epochs_advanced = max(1, opt.local_epoch - p.epoch)
        self._epoch_times.append((now - p._epoch_started) / epochs_advanced)
        recent = self._epoch_times[-5:]
        p.global_samples_per_second = self.record.target_batch_size / (sum(recent) / len(recent))
        p.epoch, p._epoch_started = opt.local_epoch, now
        p.epoch_samples, p._epoch_first_sample = p.samples - p._epoch_first_sample, p.samples
        epoch_steps, p._epoch_first_step = p.local_steps - p._epoch_first_step, p.local_steps
        if self.inner_opt is not None:
            self._on_outer_step(epoch_steps)
        if p._epoch_losses:
            p.loss = _mean_finite(p._epoch_losses)
            p._epoch_losses = []
        p.last_group_size = opt.last_group_size
        p.rounds = dict(opt.rounds)
        p.state_downloads = opt.state_downloads
        p.short_state_downloads = opt.catch_ups_short
        averager = opt.grad_averager
        if averager is not None:  # counted by the averager; brought to this process's metrics here
            for name, counter in _AVERAGER_COUNTERS:
                self._bring(name, getattr(averager, name), counter)
        self._bring("nonfinite_state_withheld", opt.state_averager.nonfinite_state_withheld, metrics.nonfinite_state_withheld)
        for reason, total in self.admission.refusals().items():  # counted here and in the averagers' processes
            metrics.refused.labels(run, reason).inc(total - p.refused.get(reason, 0))
            p.refused[reason] = total
        sent, received = self.traffic.update()
        self._bring("tcp_sent_bytes", sent, metrics.tcp_sent_bytes)
        self._bring("tcp_received_bytes", received, metrics.tcp_received_bytes)
        metrics.epoch.labels(run).set(p.epoch)
        metrics.loss.labels(run).set(p.loss)
        metrics.samples_per_second.labels(run).set(p.global_samples_per_second)
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
        if self.config.checkpoint_dir is not None and p.epoch % self.config.checkpoint_every == 0:
            self.save_checkpoint()

    def evaluate(self, epoch: int) -> None:
        """The evaluate function's held-out loss of the model as it is now (at ``epoch``). A failing evaluate (the
        user's code) costs a WARNING line and a NaN, never the training."""
        assert self._evaluate is not None and self._model is not None
        model, training = self._model, self._model.training
        try:
            model.eval()
            with torch.no_grad(), self.autocast:
                value = float(self._evaluate(model))
        except Exception as err:  # noqa: BLE001 - the user's code
            value = float("nan")
            logger.warning("evaluation failed epoch=%d error=%s: %s", epoch, type(err).__name__, " ".join(str(err).split()))
        finally:
            model.train(training)
        self._record_eval(value, epoch)

    def _record_eval(self, value: float, epoch: int) -> None:
        p = self.progress
        p.eval_loss, p.eval_epoch = value, epoch
        metrics.eval_loss.labels(self.config.run).set(value)
        logger.info("evaluated epoch=%d eval_loss=%.6g", epoch, value)

    def _bring(self, name: str, total: int, counter: Any) -> None:
        """A running total counted elsewhere (averager, optimizer, kernel) into its counter and the progress."""
        counter.labels(self.config.run).inc(total - getattr(self.progress, name))
        setattr(self.progress, name, total)

    def _on_outer_step(self, steps: int) -> None:
        assert self.opt is not None
        p, run = self.progress, self.config.run
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

    # -- checkpoints

    def _resume(self) -> None:
        assert self.opt is not None and self.record is not None and self._model is not None
        directory = self.config.checkpoint_dir
        if directory is None:
            return
        try:
            state = checkpoint.load(directory)
        except checkpoint.UnreadableCheckpoint as err:
            others = [peer for peer in fetch_peers(self.dht, self.record.run_id, self.admission) if peer != self.peer_id]
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
                f"checkpoint in {directory} belongs to run {state.get('run_id')!r} "
                f"(fingerprint {state.get('fingerprint')}); use another --checkpoint-dir for run {self.record.run_id!r}"
            )
        self._model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt.share_averaged_statistics()
        if self.inner_opt is not None and state.get("inner_optimizer") is not None:
            self.inner_opt.load_state_dict(state["inner_optimizer"])
        # the optimizer's own parameters: DiLoCo's outer ones as saved, else the model's
        outer = state.get("outer_parameters") if self.inner_opt is not None else None
        self.opt.set_optimized_parameters(outer if outer is not None else [p.detach() for p in self._model.parameters()])
        if outer is not None:  # that copied the outer parameters into the model, whose own had moved on from them
            self._model.load_state_dict(state["model"])
        if isinstance(state.get("data"), dict):
            if self._batches is not None:
                self._batches.load_state_dict(state["data"])
            else:
                self._data_state = state["data"]
        self.progress.epoch = self.opt.local_epoch
        logger.info("resumed from checkpoint dir=%s epoch=%d", directory, self.opt.local_epoch)

    def save_checkpoint(self) -> None:
        if self.config.checkpoint_dir is None or self.opt is None or self.record is None or self._model is None:
            return
        if not self.parameters_finite():  # a diverged or faulty peer: its last checkpoint stays what a restart loads
            logger.warning("checkpoint not written: the parameters are not finite; %s keeps the last one", self.config.checkpoint_dir)
            return
        state = {
            "run_id": self.record.run_id,
            "task": self.record.task,  # what builds the model (mesh export)
            "fingerprint": self.record.fingerprint,
            "epoch": self.opt.local_epoch,
            "model": {k: v.detach().cpu() for k, v in self._model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "progress": self.progress.snapshot(),
        }
        data = self._batches.state_dict() if self._batches is not None else self._data_state
        if data is not None:
            state["data"] = data  # where this peer's data is: a restart goes on from there
        if self.inner_opt is not None:  # DiLoCo: the outer parameters (the optimizer's) and the inner optimizer
            state["outer_parameters"] = [param.detach().cpu().clone() for param in self.opt.optimized_parameters]
            state["inner_optimizer"] = self.inner_opt.state_dict()
        path = checkpoint.save(self.config.checkpoint_dir, state)
        logger.info("checkpoint written path=%s epoch=%d", path, self.opt.local_epoch)

    # -- what the peer tells others

    def write_status(self, **extra: Any) -> None:
        """Write the status file; ``state`` (waiting, training, left) is remembered for later epochs' writes."""
        self.state = extra.pop("state", self.state)
        if self.config.status_file is None:
            return
        data = self.progress.snapshot(run_id=self.config.run, peer_id=self.peer_id, device=str(self.device), state=self.state, **extra)
        atomicfile.write(self.config.status_file, json.dumps(data))

    def presence(self) -> PeerPresence:
        p = self.progress
        return PeerPresence(
            run_id=self.config.run,
            epoch=int(p.epoch),
            samples_per_second=float(p.global_samples_per_second),
            loss=None if math.isnan(p.loss) else float(p.loss),
            device=str(self.device),
            time=time.time(),
        )

    def heartbeat(self, addrs: list[str]) -> dict:
        """The body of a heartbeat: a snapshot of the progress (read without locking: plain attributes)."""
        p, record = self.progress, self.record
        assert record is not None
        return {
            "run_id": record.run_id,
            "task": record.task,
            "addrs": addrs,
            "device": str(self.device),
            "gpu_name": self.gpu_name,
            "epoch": int(p.epoch),
            "samples_per_second": float(p.global_samples_per_second),
            "loss": None if p.loss != p.loss else float(p.loss),
            "lr": float(p.lr) if math.isfinite(p.lr) else None,
            # the held-out loss of this epoch (evaluated before the epoch shows), none between evaluations
            "eval_loss": float(p.eval_loss) if p.eval_epoch == p.epoch and math.isfinite(p.eval_loss) else None,
            "hyperparameters": {name: getattr(record, name) for name in HYPERPARAMETERS},  # a run first seen there
        }

    def _wait_for_announcements(self, count: int, timeout: float) -> None:
        """Block until ``count`` peers announce this run (or ``timeout``, or a stop)."""
        self._min_peers_deadline, seen = time.monotonic() + timeout, 0
        while not self.stop.is_set() and time.monotonic() < self._min_peers_deadline:
            seen = len(fetch_peers(self.dht, self.config.run, self.admission))
            if seen >= count:
                return
            self.stop.wait(0.5)
        if not self.stop.is_set():
            logger.warning("only %d of %d peers after %.0fs; training with them", seen, count, timeout)

    def _wait_for_tracker(self, count: int, timeout: float) -> None:
        """After the first step (which reported): refresh hivemind's progress tracker until it counts ``count``
        peers. It counts a peer only once it has reported samples, on its own schedule (seconds); left alone, a
        fast peer would finish its first epoch before it sees the others."""
        assert self.opt is not None
        seen = 0
        while not self.stop.is_set() and time.monotonic() < self._min_peers_deadline:
            self.opt.tracker.refresh()
            seen = self.opt.tracker.global_progress.num_peers
            if seen >= count:
                logger.info("peers ready peers=%d", seen)
                return
            self.stop.wait(0.25)

    def status_line(self) -> str:
        p, rounds = self.progress, self.opt.rounds if self.opt is not None else {}
        return (
            f"epoch {p.epoch}  loss {p.loss:.4f}  {p.global_samples_per_second:.1f} samples/s (run)  group {p.last_group_size}"
            f"  rounds ok {rounds.get('ok', 0)} failed {rounds.get('failed', 0)}  steps {p.local_steps}"
        )

    def log_progress(self) -> None:
        p, rounds = self.progress, self.opt.rounds if self.opt is not None else {}
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
            rounds.get("ok", 0),
            rounds.get("failed", 0),
            p.nonfinite_skips,
        )

    # -- leaving

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.leave()

    def leave(self) -> bool:
        """Leave the run within ``shutdown_timeout``, in a fixed, logged order: heartbeats and announcements
        stop, the checkpoint and the status file are written, the optimizer's helpers and the DHT node shut
        down; whatever is left is killed. True when every step finished in time (else ``exit_code`` is 1)."""
        if self.dht is None:
            return True
        if self.opt is not None and self.record is not None and self.reason == "max_epochs":
            self.write_status(state="finishing")
            # the others that were in no complete round with this peer at the end wait for each other, then average
            record = self.record
            try:
                self.progress.final_round = self.opt.finish(2 * record.averaging_timeout + record.matchmaking_time, self.stop)
            except Exception as err:  # the leave goes on: the checkpoint holds this peer's own state
                logger.warning("final parameter round failed: %s: %s", type(err).__name__, err)
                self.progress.final_round = {"error": f"{type(err).__name__}: {err}"}
        if self.opt is not None:
            self.log_progress()
            logger.info("leaving run=%s reason=%s epoch=%d", self.config.run, self.reason, self.opt.local_epoch)
        steps = list(self._threads)
        if self.opt is not None:
            steps += [("checkpoint", self.save_checkpoint), ("status", lambda: self.write_status(state="left"))]
            if self.trackers is not None:
                steps.append(("trackers", self.trackers.close))
            steps.append(("optimizer", self.opt.shutdown))
        steps.append(("dht", self.dht.shutdown))
        self.dht = None
        finished = lifecycle.run_steps_with_deadline(steps, self.config.shutdown_timeout)
        if not finished:
            self.exit_code = 1
        lifecycle.kill_descendants()
        logger.info("peer stopped exit_code=%d", self.exit_code)
        return finished


def _factory_of(optimizer: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
    """A factory making another ``optimizer`` (its class and its defaults) over the parameters hivemind gives."""
    cls, settings = type(optimizer), dict(optimizer.defaults)
    return lambda params: cls(params, **settings)


def _batch_size(batch: Any) -> int | None:
    """The leading dimension of a batch's first tensor (a tensor, or one in a tuple, list or dict), else None."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size is not None:
            return size
    size = getattr(batch, "batch_size", None)
    return size if isinstance(size, int) else None


def _mean_finite(losses: list[Any]) -> float:
    """The mean of the finite ones among ``losses`` (tensors and numbers), in one device read; NaN if none."""
    device = next((v.device for v in losses if isinstance(v, torch.Tensor)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in losses])
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def coordinator_hyperparameters(run: dict) -> dict:
    """A coordinator's run's settings, as PeerConfig fields (None: the task's default; optimizer "task": the task's
    own factory decides, it is not an --optimizer choice)."""
    hyper = run.get("hyperparameters") or {}
    return {
        name: hyper[name] for name in HYPERPARAMETERS if hyper.get(name) is not None and not (name == "optimizer" and hyper[name] == "task")
    }


def _tracker_dir(config: PeerConfig) -> Path:
    if config.tracker_dir is not None:
        return config.tracker_dir
    return config.checkpoint_dir / "trackers" if config.checkpoint_dir is not None else Path("mesh-trackers") / config.run
