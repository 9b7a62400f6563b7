"""The mesh's averagers: hivemind's gradient and state averagers with groups that close as soon as everyone is in,
the gradient all-reduce on torch's process groups (:mod:`mesh.dataplane`) in the training process, standing groups
that skip matchmaking while nothing changes, and each round's outcome counted.

hivemind closes a matchmaking group early only when it reaches ``target_group_size``; otherwise every round waits
the full matchmaking time. The right size is the number of live peers of the run, which changes, while the
matchmaker lives in the averager's own process. So the trainer writes the wanted size into shared memory before
each round and the averager's process applies it when the round begins (:class:`GroupSizeMixin`).

Gradient rounds (:class:`MeshGradientAverager`, plugged in through ``hivemind.Optimizer(grad_averager_factory=)``)
are :class:`~mesh.planeround.PlaneRound` handles, run on one thread of the training process:
- **matched**: hivemind's matchmaking (in the averager's process) finds the group, with every member's data-plane
  endpoint in the gathered metadata; ``_aggregate_with_group`` (the extension point hivemind's own PowerSGD
  averager overrides) then hands the group back instead of averaging, and the training process averages through
  the group's cached process group. A group in which some member offers no endpoint (``--data-plane hivemind``, a
  client-mode peer behind NAT, an older version) is averaged by hivemind's all-reduce in the averager's process.
- **standing**: after an ok round in a settled group (every live peer in, one epoch, nobody new, drifted or
  leaving), the next round skips matchmaking altogether and runs on the same process group. Every member decides
  this from the same table (the round's exchange, :func:`mesh.dataplane.exchange`), so all skip or none does.
A collective that fails (a member died, stalled or left) fails the round within the averaging timeout: hivemind
then steps with the local gradient, as before, and the next round goes through matchmaking again.

The host side counts each epoch's outcome through the public methods hivemind.Optimizer calls on its gradient
averager: ``schedule_step`` (a round begins), ``notify_used_averaged_gradients`` (its result was used or replaced
by the local gradient) and ``reset_accumulated_grads_`` (the epoch is over).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

from mesh import asyncio_guard, dataplane, metrics
from mesh.admitted import AdmittedAverager, SignedState
from mesh.planeround import PlaneRound
from mesh.rounds import RoundWatcher, record_traffic

logger = logging.getLogger(__name__)
# A process group that became garbage must be freed in the process whose threads it owns: collected in a forked
# child (hivemind forks its helpers), its destructor waits forever on threads the child does not have
os.register_at_fork(before=gc.collect)
asyncio_guard.install()  # hivemind's fire-and-forget tasks, in the averagers' processes too (see mesh/asyncio_guard.py)

OUTCOMES = ("ok", "failed", "local_only")


class GroupSizeMixin:
    """``target_group_size`` set from the host before every round: a group closes the moment it is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._wanted_group_size = mp.Value(ctypes.c_int, 0, lock=False)  # shared with the averager's process
        super().__init__(*args, **kwargs)

    def set_target_group_size(self, size: int) -> None:
        """Close the next group once it has ``size`` members (0: hivemind's default, wait the matchmaking time)."""
        self._wanted_group_size.value = max(0, int(size))

    async def _step(self, **kwargs: Any) -> None:  # runs in the averager's process, before matchmaking
        size = self._wanted_group_size.value
        matchmaking = self._matchmaking
        matchmaking.target_group_size = matchmaking.potential_leaders.target_group_size = size if size >= 2 else None
        # the key manager sizes buckets by target_group_size and fails if a group is larger (peers may briefly
        # disagree on the size); with no group bits its buckets mean nothing, so let it size them by the group
        matchmaking.group_key_manager.target_group_size = None
        return await super()._step(**kwargs)


class DeclareThrottleMixin:
    """hivemind.Optimizer sets ``state_sharing_priority`` (this peer's epoch) every epoch, and each change re-declares
    the averager as a state donor in the DHT at once: a DHT store (a lookup, then a store on every node holding the
    key) per averager per epoch, the largest part of the helpers' load with epochs of a second. Here a change is
    passed on at most every ``DECLARE_MIN_PERIOD`` seconds; in between, donors are declared with an epoch up to that
    old, which only orders donors that are all equally fresh in a steady run (a joiner still gets the newest state:
    it is what every donor serves)."""

    DECLARE_MIN_PERIOD = 10.0
    _last_declared = -float("inf")

    @property
    def state_sharing_priority(self) -> float:
        return DecentralizedAverager.state_sharing_priority.fget(self)  # type: ignore[attr-defined]

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        now = time.monotonic()
        if now - self._last_declared >= self.DECLARE_MIN_PERIOD:
            self._last_declared = now
            DecentralizedAverager.state_sharing_priority.fset(self, value)  # type: ignore[attr-defined]


class LastRoundMixin(DecentralizedAverager):
    """Keeps the handle of the last averaging round: ``TrainingStateAverager`` starts its rounds through this
    (averaging-level) ``step`` and never returns their result."""

    _last_round: StepControl | None = None

    def step(self, *args: Any, **kwargs: Any):
        control = super().step(*args, **kwargs)
        if isinstance(control, StepControl):
            self._last_round = control
        return control

    def take_round_size(self) -> int | None:
        """The group size of the last round if it finished with a result since the last call, else None."""
        control, self._last_round = self._last_round, None
        if control is None or not control.done():
            return None
        try:
            return len(control.result(timeout=0))
        except BaseException:  # failed or cancelled
            return None


class LoadedEpochMixin(DecentralizedAverager):
    """Keeps the epoch of the last state downloaded (and verified: ``AdmittedAverager`` comes after this mixin):
    ``TrainingStateAverager.load_state_from_peers`` returns nothing, applies a state only if its epoch is not behind
    the local one, and the caller (hivemind.Optimizer) may then relabel it with the swarm's epoch."""

    loaded_epoch: int | None = None  # None: no state came since the caller last set it to None

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if loaded is not None:
            metadata = loaded[0]
            epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
            self.loaded_epoch = epoch if isinstance(epoch, int) else None
        return loaded


async def _off_the_loop(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on the event loop's executor: a pass over a large state would stall the averager's RPCs."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


class ExactRoundMixin(DecentralizedAverager):
    """Members of a parameter round end it holding the same tensors, bit for bit.

    hivemind's all-reduce hands each member its parts' mean as a difference from its own values (mean − own,
    computed by the part's reducer in the tensors' dtype), which the member adds back. In float32, own + (mean − own)
    is the mean only where the difference is exact: not, for instance, for a value near zero that members hold with
    opposite signs. Members then came out of the round that was meant to make them agree an ulp apart, and stayed
    apart until the next round that checked their parameters.

    With ``exact_rounds`` the round runs on float64 copies. The reducer still computes a float32 mean (hivemind sums
    into a float32 buffer); the difference of two float32 values is exact in float64 (short of magnitudes 2^29
    apart), so every member adds it back to exactly that mean, and the copy back into the state is exact too.
    Costs the round twice its bytes on the wire and a float64 copy of the averaged state while it runs. Parts
    keep the same number of values as in float32 rounds, so members of an older version still average with these
    (an exact round for the members that run one). ``--averaging local`` keeps float32: its parameter round every
    epoch is its averaging, and members step apart right after it."""

    def __init__(self, *args: Any, exact_rounds: bool = False, **kwargs: Any) -> None:
        self.exact_rounds = exact_rounds
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ):
        if not self.exact_rounds or not tensors:
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        sizes = {tensor.element_size() for tensor in tensors}
        if len(sizes) == 1:  # parts of as many values as a round in the tensors' own dtype
            kwargs["part_size_bytes"] = kwargs.get("part_size_bytes", DEFAULT_PART_SIZE_BYTES) * 8 // sizes.pop()
        wide = await _off_the_loop(lambda: [tensor.detach().double() for tensor in tensors])
        await super()._run_allreduce_inplace_(wide, group_info, group_id, **kwargs)
        await _off_the_loop(_copy_, tensors, wide)


@torch.no_grad()  # grad mode is per thread: the executor's is on
def _copy_(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    for target, value in zip(targets, values):
        target.copy_(value)


class FiniteStateMixin(DecentralizedAverager):
    """A member never offers a state (parameters, optimizer statistics) that is not finite: a fault, or a local step
    that diverged (after a failed round, with its own gradient or DiLoCo pseudo-gradient, or in DiLoCo's inner
    steps). Without this, its NaN or inf went into the next parameter round's mean, hence into every member's
    parameters, and the whole run ended as diverged; and a joiner could download it.

    - **In a parameter round** it contributes nothing (zeros, weight 0) and takes the mean of the others, which
      repairs it. The round is run on a scratch copy, so a round that fails leaves its own tensors as they were (the
      session then takes the run's state from peers); when no member's was finite the mean is 0/0 and each keeps its
      own (the session then finds no finite state to take: the run diverged).
    - **To a joiner** asking for the state it answers nothing, as hivemind's averager does when it does not share
      its state: the joiner asks the next donor.

    Both run in the averager's process: the round on the tensors being averaged, the download on the state the
    training process would serve. Counted: :attr:`nonfinite_state_withheld`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._withheld = mp.Value(ctypes.c_long, 0, lock=False)  # counted in the averager's process
        super().__init__(*args, **kwargs)

    @property
    def nonfinite_state_withheld(self) -> int:
        """Times this peer's state was not finite and it kept it out of a parameter round or a download."""
        return int(self._withheld.value)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ):
        if await _off_the_loop(dataplane.finite, tensors):
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        self._withheld.value += 1
        logger.warning("this peer's state is not finite: it takes the parameter round's mean and adds nothing to it")
        scratch = [torch.zeros_like(tensor) for tensor in tensors]
        await super()._run_allreduce_inplace_(scratch, group_info, group_id, **{**kwargs, "weight": 0.0})
        # hivemind ends a round in which a member failed to reduce its part normally, with that part unchanged:
        # here, zeros, which would pass for a finite state; so the mean is taken only when it came whole
        runner = self._running_groups[group_info.group_id if group_id is None else group_id].result()
        if runner.tensor_part_container.failed_size:
            logger.warning("the parameter round lost a part of its mean: this peer's state stays as it is")
        elif not await _off_the_loop(dataplane.finite, scratch):
            # 0/0: no member had a finite state (raising here would only have hivemind retry the round)
            logger.warning("no member of the parameter round had a finite state: this peer's stays as it is")
        else:
            for tensor, mean in zip(tensors, scratch):
                tensor.copy_(mean)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        # what would be served: hivemind's averaged tensors are the optimizer's own only with reuse_tensors, and
        # stale copies otherwise (--averaging local); the state is built in the training process
        _metadata, state, _infos = await self._get_current_state_from_host_process()
        if not await _off_the_loop(dataplane.finite, state):
            self._withheld.value += 1
            logger.warning("this peer's state is not finite: not served to %s", context.remote_id)
            return
        async for message in super().rpc_download_state(request, context):
            yield message


class MeshStateAverager(
    DeclareThrottleMixin,
    GroupSizeMixin,
    SignedState,
    TrainingStateAverager,
    LastRoundMixin,
    LoadedEpochMixin,
    AdmittedAverager,
    FiniteStateMixin,  # after the admission: a download request is checked (and counted) as an outsider's first
    ExactRoundMixin,  # after the finite check: a member that adds nothing takes the exact mean too
):
    """hivemind's state averager (parameters, optimizer state), with the group size set per round, the last round's
    size kept, a state that is not finite kept out of rounds and downloads, and the run's admission
    (mesh/admitted.py) on matchmaking, state serving and state downloads."""


@dataclass(frozen=True)
class Match:
    """What the averager's process hands back for a data-plane group: the training process averages."""

    group_id: bytes
    gathered: dict  # peer id -> the member's gathered metadata


# a member's row in a round's exchange (float64 each); "resync" and "leaving" are 0 or 1, "epoch" -1 when unknown,
# "params" a digest of the member's parameters when the round checks them (parameter_digest), else NaN
ROW = ("weight", "epoch", "rate", "batch", "live", "resync", "leaving", "params")
STALE_WEIGHT_FACTOR = 2.0**-30  # hivemind's all-reduce: a member behind the group's epoch weighs this much of itself
PAUSE_AFTER_FAILED_BUILD = 10  # rounds on hivemind's all-reduce after a process group could not be built (not clipped)


def decode_row(row: list[float]) -> dict:
    data = dict(zip(ROW, row))
    return {
        "weight": data["weight"],
        "epoch": int(data["epoch"]) if data["epoch"] >= 0 else None,
        "rate": data["rate"],
        "batch": int(data["batch"]),
        "live": int(data["live"]),
        "resync": bool(data["resync"]),
        "leaving": bool(data["leaving"]),
        "params": data["params"],
    }


def parameter_digest(parameters: Iterable[torch.Tensor]) -> float:
    """A number that equal parameters give alike, bit for bit (the same reductions of the same values), and unequal
    ones almost never: the float64 sum of every value plus π times the sum of their squares. Read-only passes.
    Blind to order (the same values elsewhere give the same digest), which the drift it looks for (members' steps
    diverging by rounding or a missed round) never is."""
    with torch.no_grad():
        terms = [
            flat.sum(dtype=torch.float64) + math.pi * torch.dot(flat, flat).double()
            for flat in (p.detach().reshape(-1) for p in parameters)
        ]
        return float(torch.stack(terms).sum()) if terms else 0.0  # one read back (a GPU peer's: one sync)


def complete_rows(gathered: dict) -> list[dict] | None:
    """Every member's metadata of a round, or None when some member's is malformed (another version) or none came."""
    rows = [data for data in gathered.values() if isinstance(data, dict)]
    return rows if rows and len(rows) == len(gathered) else None


def parameters_agree(gathered: dict) -> bool:
    """Whether every member of a round's group checked its parameters and all digests are equal."""
    rows = complete_rows(gathered)
    if rows is None or len(rows) < 2:
        return False
    digests = [data.get("params") for data in rows]
    return all(isinstance(d, float) and math.isfinite(d) for d in digests) and len(set(digests)) == 1


def current_weights(weights: list[float], epochs: list[int | None]) -> list[float]:
    """The members' weights in a round, with every member behind the group's epoch (the newest among the members
    with weight) left out: its contribution was computed on parameters an epoch or more old (a late joiner still
    catching up, a member whose view of the swarm's epoch lagged), and would pull the mean back. hivemind.Optimizer
    likewise drops a peer's batch while it is behind the swarm. A member that publishes no epoch keeps its weight;
    if leaving the others out would leave no weight at all, the weights stay as they are. Every member of a round
    computes this from the same table, so all apply the same weights."""
    newest = max((e for w, e in zip(weights, epochs) if w > 0 and e is not None), default=None)
    current = [0.0 if newest is not None and e is not None and e < newest else float(w) for w, e in zip(weights, epochs)]
    return current if sum(current) > 0 else [float(w) for w in weights]


def settled(gathered: dict) -> bool:
    """Whether a round's group was settled: every live peer in, all in one epoch, nobody new, drifted or leaving.
    Every member sees the same metadata, so all members decide alike."""
    rows = complete_rows(gathered)
    if rows is None:
        return False
    live = max(int(data.get("live") or 0) for data in rows)
    epochs = {data.get("epoch") for data in rows}
    return (
        len(rows) >= live
        and len(epochs) == 1
        and None not in epochs
        and not any(data.get("resync") or data.get("leaving") for data in rows)
    )


class MeshGradientAverager(DeclareThrottleMixin, GroupSizeMixin, SignedState, GradientAverager, AdmittedAverager):
    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        *,
        run_id: str,
        compression_name: str,
        data_plane_host: str | None,
        nccl_device: torch.device | None = None,
        aggregation: str = "mean",
        **kwargs: Any,
    ) -> None:
        # compression_name (none, fp16, 8bit) picks the data plane's method; hivemind's ``compression`` codec is
        # the wire format on its own all-reduce and, for 8bit, on the data plane too
        self.run_id, self.compression_name, self.codec = run_id, compression_name, kwargs.get("compression")
        self.data_plane_host = data_plane_host
        # clipped (docs/security.md): each contribution bounded by the median one, on the data plane only
        self.aggregation = aggregation
        self.clipped_outliers = 0  # contributions far above the group's median (dataplane.OUTLIER_FACTOR)
        self.unbounded_steps_skipped = 0  # clipped: epochs whose round failed, stepped with no gradient instead
        self.behind_rounds = 0  # rounds this member joined behind the group's epoch: its contribution left out
        self._timeout = kwargs.get("allreduce_timeout") or 30.0
        # the averaged gradients are views of one flat shared buffer: the data plane reduces it in place
        self._flat = None
        parameters = tuple(parameters)
        if data_plane_host is not None:
            if kwargs.get("averaged_grads"):
                raise ValueError("the data plane averages its own flat buffer: do not pass averaged_grads with it")
            self._flat, views = dataplane.flat_views([torch.zeros_like(p, device="cpu") for p in parameters])
            kwargs["averaged_grads"] = views
        super().__init__(parameters, **kwargs)
        # everything below exists in the training process only: the averager's process forked above
        self._store = dataplane.StoreHost(data_plane_host, self._timeout) if data_plane_host is not None else None
        self._groups = dataplane.GroupCache(data_plane_host, self._timeout, self.admission) if data_plane_host is not None else None
        # the data plane's one thread: collectives run in order, off the training thread (hivemind's wait=False)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="data-plane") if data_plane_host is not None else None
        self._standing: tuple[Any, Any, list[PeerID]] | None = None  # (gloo group, NCCL group or None, members in rank order)
        self._plane_paused = 0  # rounds left on hivemind's all-reduce after a failed build
        # NCCL (--data-plane nccl): offered on this CUDA device; a group where every member offers one moves its
        # gradients there, through a buffer on the device; after an NCCL collective failed, not offered for a while
        self._nccl_device = nccl_device if data_plane_host is not None else None
        self._gpu = dataplane.gpu_identity(nccl_device) if self._nccl_device is not None else ""
        self._nccl_paused = 0
        self._gpu_flat: torch.Tensor | None = None
        self._gpu_views: list[torch.Tensor] = []
        self.nccl_rounds = 0  # ok rounds whose gradients moved on NCCL
        self.data_plane_builds = 0  # process groups built
        self.data_plane_fallbacks = 0  # process groups that could not be built
        self.standing_rounds = 0  # ok rounds that skipped matchmaking
        self._last_round_end: float | None = None  # when this member's last data-plane round ended (monotonic)

        self.rounds = {outcome: 0 for outcome in OUTCOMES}
        self.last_outcome: str | None = None
        self.last_group_size = 0
        self.wants_state_averaging = False
        # the last ok round's group, the whole swarm, checked its parameters and found them equal: the routine
        # parameter round of this epoch has nothing to do (MeshOptimizer.average_state_every)
        self.parameters_agree = False
        self.check_parameters: Callable[[], bool] | None = None  # whether this epoch's round checks parameters
        self.state_rounds_skipped = 0
        self.resync_wanted = True  # a new member asks its first group to average parameters
        self.leaving = False  # set when this peer shuts down: its last round tells the group
        # whether this peer's last round averaged with every live peer (or it was alone in the run): if not, members
        # may hold different parameters, and at the run's end MeshOptimizer.finish averages them once more
        self.last_round_complete = True
        self.gradient_wire_bytes = 0
        self.on_state_group: Callable[[int], None] | None = None  # told the size of a group that averages parameters
        # this peer's epoch and samples/s, published with its batch size: members of a group plan the next epoch
        # from each other's pace (mesh.epochplan), and a member that was behind the others catches up
        self.local_epoch: Callable[[], int] | None = None
        self.local_rate: Callable[[], float] | None = None
        self.batch_size = 0  # of the last accumulated batch
        self._last_round: tuple[dict, bool] | None = None  # the last ok round: gathered metadata, settled
        self._round: StepControl | PlaneRound | None = None
        self._in_step = False
        self.watcher = RoundWatcher(run_id)
        self.watcher.start()

    # ---- host side: gathered metadata and the round's outcome ----

    def endpoint(self) -> dataplane.Endpoint | None:
        if self._store is None or self._plane_paused > 0:
            return None
        gpu = self._gpu if self._nccl_paused == 0 else ""
        return dataplane.Endpoint(self.data_plane_host, self._store.port, self._groups.current, gpu)

    def _metadata(self) -> dict:
        endpoint = self.endpoint()
        return {
            "dp": endpoint.to_wire() if endpoint is not None else None,
            "resync": bool(self.resync_wanted),
            "live": int(self._wanted_group_size.value),
            # the group's members plan the next epoch from each other's pace (mesh.epochplan)
            "epoch": int(self.local_epoch()) if self.local_epoch is not None else None,
            "rate": float(self.local_rate()) if self.local_rate is not None else None,
            "batch": int(self.batch_size),
        }

    def _row(self, weight: float) -> list[float]:
        """This member's row of the round's exchange, in ``ROW``'s order (:func:`decode_row` reads it back)."""
        data = self._metadata()
        epoch, rate = data["epoch"], data["rate"]
        values = {
            "weight": weight,
            "epoch": epoch if epoch is not None else -1,
            "rate": rate if rate is not None and math.isfinite(rate) else 0.0,
            "batch": data["batch"],
            "live": data["live"],
            "resync": data["resync"],
            "leaving": self.leaving,
            "params": parameter_digest(self.checked_parameters()) if self.check_parameters and self.check_parameters() else math.nan,
        }
        return [float(values[name]) for name in ROW]

    def schedule_step(self, scheduled_time: float | None = None, **kwargs: Any) -> StepControl | PlaneRound:
        control: StepControl | PlaneRound
        if self._executor is not None and self._standing is not None:
            control = PlaneRound(partial(self._reduce, *self._standing, {}), self._executor)
        else:
            kwargs.setdefault("gather", self._metadata())
            # no retry within a round: a collective that failed midway has left the buffer half-reduced, so the
            # round fails and hivemind steps with the local gradient (reloaded from the accumulators: see step)
            kwargs.setdefault("allow_retries", self._store is None)
            control = super().schedule_step(scheduled_time, **kwargs)
            if self._executor is not None:
                self._plane_paused = max(0, self._plane_paused - 1)
                self._nccl_paused = max(0, self._nccl_paused - 1)
                control = PlaneRound(self._matched, self._executor, inner=control)
        self._round = control
        self.watcher.watch(control)
        return control

    def accumulate_grads_(self, batch_size: int) -> None:
        super().accumulate_grads_(batch_size)
        self.batch_size = batch_size

    def take_group(self) -> tuple[dict, bool] | None:
        """The last round's gathered metadata and whether its group was settled, if it was ok (once)."""
        group, self._last_round = self._last_round, None
        return group

    def step(self, *args: Any, reset_accumulators: bool = True, **kwargs: Any):
        """hivemind's step, with the accumulators kept until the epoch ends (hivemind.Optimizer resets them then,
        ``reset_accumulated_grads_``): hivemind's own step zeroes them before the round, so a round that failed
        fell back to a zero "local gradient" (hivemind reloads the accumulators for its fallback)."""
        self._in_step = True
        try:
            return super().step(*args, reset_accumulators=False, **kwargs)
        finally:
            self._in_step = False

    # ---- what is averaged: the accumulated gradients (a subclass averages something else: mesh.diloco) ----

    def checked_parameters(self) -> Iterable[torch.Tensor]:
        """The parameters whose digest a round compares (members that agree on them step alike)."""
        return self.parameters

    def load_scale(self) -> float:
        """The factor the accumulators are loaded with: the mean over the accumulation steps."""
        times = self.local_times_accumulated
        return 1.0 / times if times else 0.0

    def load_into_(self, buffers: list[torch.Tensor], scale: float) -> None:
        """This member's contribution times ``scale`` into ``buffers``, in one pass."""
        dataplane.load_scaled_(buffers, list(self._grad_accumulators()), scale)

    @torch.no_grad()
    def load_accumulators_into_averager_(self) -> None:
        """This member's contribution (the accumulated gradients, divided by the number of accumulation steps) into
        the averaging buffer, in one pass. A standing round's step defers it to the round itself, which folds its
        share of the group's weight into the same pass once the exchange has told it (:meth:`load_into_`)."""
        scale = self.load_scale()
        round_ = self._round
        if self._in_step and isinstance(round_, PlaneRound) and round_.inner is None and not round_.triggered:
            round_.load_scale = scale
            return
        if not self._in_step and self.aggregation == "clipped" and self._wanted_group_size.value > 1:
            # hivemind's fallback after a round without the group: --aggregation clipped never applies a gradient
            # nobody else bounded (a faulty member's own would put its parameters, then everyone's through the
            # next parameter round or state download, far off); the epoch's step is a zero-gradient step
            scale = 0.0
            self.unbounded_steps_skipped += 1
        with self.get_tensors() as averaged:
            self.load_into_(list(averaged), scale)

    def notify_used_averaged_gradients(self) -> None:
        super().notify_used_averaged_gradients()
        control, self._round = self._round, None
        if control is None or not control.triggered:
            self._record("local_only", 1)
            return
        try:
            gathered = control.result(timeout=0)
        except BaseException as err:  # the peer stepped with its local gradient
            self._record("failed", 1, reason=f"{type(err).__name__}: {err}")
            return
        self._record("ok", len(gathered))
        rows = [data for data in gathered.values() if isinstance(data, dict)]
        epochs = [data.get("epoch") for data in rows if isinstance(data.get("epoch"), int)]
        mine = (gathered.get(self.peer_id) or {}).get("epoch")
        if isinstance(mine, int) and mine < max(epochs, default=mine):
            self.behind_rounds += 1  # this round averaged the others' contributions only (current_weights)
        asked = any(data.get("resync") for data in rows)
        live = max([int(data.get("live") or 0) for data in rows], default=0)
        everyone = len(gathered) >= live
        # complete only if nobody asked to resync as well: members then hold different parameters until this
        # epoch's parameter round, and only one with everyone in it makes the last round complete again
        # (MeshOptimizer.step); if it fails at the run's end, MeshOptimizer.finish averages once more
        self.last_round_complete = everyone and not asked
        # the live peers outside this group stepped with another mean (or alone): this group's parameter round
        # below cannot bring them together, so the next group, which may have them, averages parameters.
        # Seen: a late joiner in two groups of 2 at one epoch (one of them with its stale gradient), then every
        # round complete and ok, and one member apart from the others to the end
        self.resync_wanted = not everyone
        # every member sees the same gathered metadata, so the whole group takes the same decisions: whether to
        # average parameters (in a group of the same size), and whether the next round skips matchmaking
        self.wants_state_averaging = asked or len(gathered) < live
        self.parameters_agree = not self.wants_state_averaging and parameters_agree(gathered)
        self.state_rounds_skipped += self.parameters_agree
        calm = settled(gathered)
        self._last_round = gathered, calm
        if isinstance(control, PlaneRound):
            plane, control.group = control.group, None  # set when the round ran on the data plane
            if calm and plane is not None:
                self._standing = plane
            if control.inner is None:
                self.standing_rounds += 1
        if self.wants_state_averaging and self.on_state_group is not None:
            self.on_state_group(len(gathered))

    def reset_accumulated_grads_(self) -> None:
        super().reset_accumulated_grads_()
        if self.last_outcome is None:  # hivemind did not even start a round: nobody else was there
            self._record("local_only", 1)
        # the epoch's parameter-averaging decision has been taken; a drift shows in the next round's "resync"
        self.last_outcome, self.wants_state_averaging, self.parameters_agree = None, False, False

    @property
    def in_standing_group(self) -> bool:
        return self._standing is not None

    def tag_along(self, round_: PlaneRound, timeout: float) -> None:
        """Join ``round_`` with weight 0 (the others' mean is theirs alone) and wait at most ``timeout``."""
        round_.weight = 0.0
        round_.allow_allreduce()
        try:
            round_.result(timeout)
        except BaseException as err:  # the group's round did not come in time, or failed: it is the others' now
            logger.info("left without the group's next round (%s)", type(err).__name__)
        self._round = None

    def leave_standing_group(self) -> None:
        """The next round goes through matchmaking (this peer took the newest state, or is leaving)."""
        self._standing = None

    def _record(self, outcome: str, size: int, reason: str = "") -> None:
        self.last_outcome, self.last_group_size, self._last_round, self._standing = outcome, size, None, None
        self.rounds[outcome] += 1
        self.last_round_complete = outcome == "local_only" and self._wanted_group_size.value <= 1
        # parameters may have drifted from the others' unless this round averaged with a complete group
        self.resync_wanted = outcome != "ok"
        self.wants_state_averaging = outcome == "failed" or (outcome == "local_only" and self._wanted_group_size.value > 1)
        metrics.averaging_rounds.labels(self.run_id, outcome).inc()
        metrics.group_size.labels(self.run_id).set(size)
        if outcome == "ok":
            record_traffic(self.run_id, self.gradient_wire_bytes, size)
        if outcome == "failed":
            logger.warning("averaging round failed (%s); stepped with the local gradient", reason or "no result")

    def shutdown(self) -> None:
        self.watcher.stop()
        super().shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            # the others' next collective with this peer fails at once (closed connections), not at the timeout
            self._standing = None
            self._groups.drop()
        if self._store is not None:
            self._store.close()
            self._store = None

    # ---- the training process's data-plane thread: the collectives ----

    def _matched(self, round_: PlaneRound) -> dict:
        """A round whose group hivemind's matchmaking found: average on its process group (built or reused)."""
        assert round_.inner is not None
        match = round_.inner.result(self._timeout)
        if not isinstance(match, Match):  # some member has no data plane: hivemind's all-reduce averaged already
            with self.get_tensors() as tensors:
                if not dataplane.finite(tensors):
                    raise MatchmakingException("hivemind's all-reduce gave non-finite values; the round fails")
            return match
        members = [(peer.to_bytes(), dataplane.Endpoint.from_wire(data["dp"])) for peer, data in match.gathered.items()]
        builds = self._groups.builds
        try:
            group, _rank = self._groups.get(members, self.peer_id.to_bytes(), match.group_id)
        except Exception as err:
            # every member fails to rendezvous alike (same store, same timeout), so all leave the data plane alike
            self._groups.drop()
            self.data_plane_fallbacks += 1
            if self.aggregation == "clipped":  # hivemind's all-reduce would fail those rounds too: build again next
                logger.warning("data plane: process group not built (%s); this round fails, the next builds anew", err)
            else:
                self._plane_paused = PAUSE_AFTER_FAILED_BUILD
                logger.warning(
                    "data plane: process group not built (%s); this round fails, the next %d use hivemind's all-reduce",
                    err,
                    PAUSE_AFTER_FAILED_BUILD,
                )
            raise MatchmakingException(f"data plane: process group not built: {err}") from None
        self.data_plane_builds += self._groups.builds - builds
        ranked = sorted(match.gathered, key=lambda peer: peer.to_bytes())  # the process group's rank order
        return self._reduce(group, self._groups.nccl, ranked, match.gathered, round_)

    def arrival_timeout(self) -> float:
        """How long a round waits for its last member: members of a settled group end their planned epochs
        together, so one that is later than a few matchmaking times, or twice this member's last epoch, has stopped
        or gone (and is waited for at most the averaging timeout)."""
        epoch = time.monotonic() - self._last_round_end if self._last_round_end is not None else self._timeout
        matchmaking = float(self.matchmaking_kwargs.get("min_matchmaking_time") or 0.0)
        return min(self._timeout, max(3 * matchmaking, 2 * epoch, 1.0))

    def _reduce(self, group: Any, nccl: Any, ranked: list[PeerID], gathered: dict, round_: PlaneRound) -> dict:
        """Exchange the members' rows (on gloo), then average the gradients in place, on NCCL when the group has it
        (8-bit's gathered codec stays on gloo); returns the round's metadata by peer."""
        round_.reducing = True
        started = time.perf_counter()
        on_gpu = nccl is not None and self.compression_name != "8bit" and self.aggregation == "mean"
        stage = "exchange"
        try:
            with self.get_tensors() as tensors:
                rows = dataplane.exchange(group, self._row(round_.weight), self.arrival_timeout())
                weights = current_weights([row[0] for row in rows], [decode_row(row)["epoch"] for row in rows])
                mine, total = weights[group.rank()], sum(weights)
                if total > 0:  # else every member tagged along with weight 0: nothing to average
                    stage = "nccl" if on_gpu else "gloo"
                    if on_gpu:
                        self._average_on_gpu(nccl, tensors, round_, mine / total)
                    elif self.aggregation == "clipped":
                        self._clipped(group, tensors, round_, [weight / total for weight in weights])
                    else:
                        self._average(group, tensors, self._flat, round_, mine / total)
                    stage = "result"
                    if not dataplane.finite([self._flat]):  # a NaN or inf applied would stay in everyone's parameters
                        raise ValueError("the mean is not finite")
        except Exception as err:
            self._groups.drop()  # the next group with this member builds a fresh process group
            if stage == "nccl":  # offer gloo only for a while: NCCL may be what fails here
                self._nccl_paused = PAUSE_AFTER_FAILED_BUILD
            raise MatchmakingException(f"data plane all-reduce failed ({stage}): {err}") from None
        self._last_round_end = time.monotonic()
        self.nccl_rounds += on_gpu and total > 0
        logger.debug("data plane all-reduce size=%d seconds=%.3f nccl=%s", len(ranked), time.perf_counter() - started, on_gpu)
        round_.group = (group, nccl, ranked)
        return {peer: {**(gathered.get(peer) or {}), **decode_row(row)} for peer, row in zip(ranked, rows)}

    def _average(self, group: Any, views: list[torch.Tensor], flat: torch.Tensor, round_: PlaneRound, share: float) -> None:
        """The weighted mean into ``views`` (of ``flat``): a deferred load folds the share into itself."""
        share = self._fold_share(views, round_, share)
        dataplane.average_(group, views, flat, share, self.compression_name, self.codec)

    def _fold_share(self, views: list[torch.Tensor], round_: PlaneRound, share: float) -> float:
        """A load left to this round is done now with ``share`` folded in; returns the share still to apply."""
        if round_.load_scale is None:
            return share
        self.load_into_(views, round_.load_scale * share)
        return 1.0

    def _clipped(self, group: Any, views: list[torch.Tensor], round_: PlaneRound, shares: list[float]) -> None:
        """The clipped weighted mean (``--aggregation clipped``): the buffer holds this member's contribution times
        its share, as the all-reduce's would, then the owner of each shard bounds every member's part of it."""
        share = self._fold_share(views, round_, shares[group.rank()])
        if share != 1.0:
            self._flat.mul_(share)
        self.clipped_outliers += dataplane.clipped_mean_(group, self._flat, shares)

    def _average_on_gpu(self, nccl: Any, tensors: list[torch.Tensor], round_: PlaneRound, share: float) -> None:
        """The mean on NCCL, through a buffer on this peer's GPU, then into hivemind's host buffer (whence
        hivemind.Optimizer copies it into the gradients, as on gloo)."""
        with torch.cuda.device(self._nccl_device):
            if self._gpu_flat is None:
                self._gpu_flat, self._gpu_views = dataplane.flat_views(tensors, device=self._nccl_device)
            if round_.load_scale is None:  # loaded into the host buffer before the round: bring it over
                self._gpu_flat.copy_(self._flat)
            self._average(nccl, self._gpu_views, self._gpu_flat, round_, share)
            self._flat.copy_(self._gpu_flat)

    # ---- the averager's process: the group, found by hivemind's matchmaking ----

    def _members(self, group_info: GroupInfo) -> tuple[bool, dict]:
        """Whether every member can use the data plane; and every member's gathered metadata by peer id (what the
        round returns), decoded once."""
        usable = True
        gathered = {}
        for peer_id, blob in zip(group_info.peer_ids, group_info.gathered):
            _bandwidth, mode, user = self.serializer.loads(blob)
            data = gathered[peer_id] = self.serializer.loads(user)
            endpoint = dataplane.Endpoint.from_wire(data.get("dp")) if isinstance(data, dict) else None
            if endpoint is None or AveragingMode(mode) != AveragingMode.NODE:
                usable = False
        return usable, gathered

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any):
        self.check_group(group_info)  # the run's admission: every member holds a valid ticket
        usable, gathered = self._members(group_info)
        usable = usable and self.data_plane_host is not None
        if not usable and self.aggregation == "clipped":  # hivemind's all-reduce has no clipping: no round
            raise MatchmakingException("--aggregation clipped: a member of this group is not on the data plane")
        if not usable:
            # each sender's weight travels with its parts: a member behind the group's epoch leaves itself out
            # (current_weights; every member of a gradient round here has weight, its samples)
            peers = list(gathered)
            epochs = [data.get("epoch") if isinstance(data, dict) else None for data in gathered.values()]
            epochs = [epoch if isinstance(epoch, int) else None for epoch in epochs]
            weight = float(kwargs.get("weight") or 0.0)
            weights = current_weights([weight if peer == self.peer_id else 1.0 for peer in peers], epochs)
            if weight > 0 and weights[peers.index(self.peer_id)] == 0:
                # not 0: the others' weights are unknown here, and one of them may be 0 too (hivemind tags along
                # with weight 0 while it downloads state); all zero, hivemind's mean is 0/0, NaN for the group
                kwargs["weight"] = weight * STALE_WEIGHT_FACTOR
                logger.info("behind the group's epoch: this round averages the others' contributions only")
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        # hivemind registers each group for its own all-reduce runner, which this round does not use: mark it
        # settled, or hivemind warns that the group "did not finish"
        self._running_groups[group_info.group_id].cancel()
        return Match(group_info.group_id, gathered)
