"""The mesh's averagers: hivemind's gradient and state averagers with groups that close as soon as everyone is in,
the gradient all-reduce on torch's process groups (:mod:`mesh.dataplane`), and each round's outcome counted.

hivemind closes a matchmaking group early only when it reaches ``target_group_size``; otherwise every round waits
the full matchmaking time. The right size is the number of live peers of the run, which changes, while the
matchmaker lives in the averager's own process. So the trainer writes the wanted size into shared memory before
each round and the averager's process applies it when the round begins (:class:`GroupSizeMixin`).

Gradient rounds (:class:`MeshGradientAverager`, plugged in through ``hivemind.Optimizer(grad_averager_factory=)``):
each member publishes its data-plane endpoint in the group's gathered metadata, and ``_aggregate_with_group`` (the
extension point hivemind's own PowerSGD averager overrides) averages through a cached ``ProcessGroupGloo``. A group
in which some member offers no endpoint (``--data-plane hivemind``, a client-mode peer behind NAT, an older
version) uses hivemind's all-reduce, as does a round whose process group cannot be built (counted). A collective
that fails (a member died or stalled) fails the round within the averaging timeout: hivemind then steps with the
local gradient, as before, and the next round rebuilds the process group.

The host side counts each epoch's outcome through the public methods hivemind.Optimizer calls on its gradient
averager: ``schedule_step`` (a round begins), ``notify_used_averaged_gradients`` (its result was used or replaced
by the local gradient) and ``reset_accumulated_grads_`` (the epoch is over).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.asyncio import enter_asynchronously

from mesh import asyncio_guard, dataplane, metrics
from mesh.rounds import RoundWatcher, record_traffic

logger = logging.getLogger(__name__)
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


class MeshStateAverager(GroupSizeMixin, TrainingStateAverager):
    """hivemind's state averager (parameters, optimizer state), with the group size set per round."""


class MeshGradientAverager(GroupSizeMixin, GradientAverager):
    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], *, run_id: str, compression_name: str, data_plane_host: str | None, **kwargs: Any
    ) -> None:
        # compression_name (none, fp16, 8bit) picks the data plane's method; hivemind's ``compression`` codec is
        # the wire format on its own all-reduce and, for 8bit, on the data plane too
        self.run_id, self.compression_name, self.codec = run_id, compression_name, kwargs.get("compression")
        self.data_plane_host = data_plane_host
        self._last_group = mp.Value(ctypes.c_uint64, 0, lock=False)  # the averager's process writes, the host reads
        self._fallbacks = mp.Value(ctypes.c_int, 0, lock=False)  # rounds that used hivemind's all-reduce
        self._builds = mp.Value(ctypes.c_int, 0, lock=False)  # process groups built
        self._timeout = kwargs.get("allreduce_timeout") or 30.0
        # the averaged gradients are views of one flat shared buffer: the data plane reduces it in place
        self._flat = None
        # set before super().__init__ forks the averager's process: everything after exists in this process only
        self._executor: ThreadPoolExecutor | None = None  # created in the averager's process, on first use
        self._groups: dataplane.GroupCache | None = None
        parameters = tuple(parameters)
        if data_plane_host is not None:
            if kwargs.get("averaged_grads"):
                raise ValueError("the data plane averages its own flat buffer: do not pass averaged_grads with it")
            self._flat, views = dataplane.flat_views([torch.zeros_like(p, device="cpu") for p in parameters])
            kwargs["averaged_grads"] = views
        super().__init__(parameters, **kwargs)
        # the rendezvous store lives in this (the training) process, created after the averager's process forked
        self._store = dataplane.StoreHost(data_plane_host, self._timeout) if data_plane_host is not None else None

        self.rounds = {outcome: 0 for outcome in OUTCOMES}
        self.last_outcome: str | None = None
        self.last_group_size = 0
        self.wants_state_averaging = False
        self.resync_wanted = True  # a new member asks its first group to average parameters
        self.gradient_wire_bytes = 0
        self.on_state_group: Callable[[int], None] | None = None  # told the size of a group that averages parameters
        # this peer's epoch and samples/s, published with its batch size: members of a group plan the next epoch
        # from each other's pace (mesh.epochplan), and a member that was behind the others catches up
        self.local_epoch: Callable[[], int] | None = None
        self.local_rate: Callable[[], float] | None = None
        self.batch_size = 0  # of the last accumulated batch
        self._last_round: tuple[dict, bool] | None = None  # the last ok round: gathered metadata, every live peer in
        self._round: StepControl | None = None
        self._in_step = False
        self.watcher = RoundWatcher(run_id)
        self.watcher.start()

    # ---- host side: gathered metadata and the round's outcome ----

    def endpoint(self) -> dataplane.Endpoint | None:
        if self._store is None:
            return None
        return dataplane.Endpoint(self.data_plane_host, self._store.port, int(self._last_group.value))

    def schedule_step(self, scheduled_time: float | None = None, **kwargs: Any) -> StepControl:
        endpoint = self.endpoint()
        kwargs.setdefault(
            "gather",
            {
                "dp": endpoint.to_wire() if endpoint is not None else None,
                "resync": bool(self.resync_wanted),
                "live": int(self._wanted_group_size.value),
                # the group's members plan the next epoch from each other's pace (mesh.epochplan)
                "epoch": int(self.local_epoch()) if self.local_epoch is not None else None,
                "rate": float(self.local_rate()) if self.local_rate is not None else None,
                "batch": int(self.batch_size),
            },
        )
        # no retry within a round: a collective that failed midway has left the buffer half-reduced, so the round
        # fails and hivemind steps with the local gradient (the accumulators are intact)
        kwargs.setdefault("allow_retries", self._store is None)
        control = super().schedule_step(scheduled_time, **kwargs)
        self._round = control
        self.watcher.watch(control)
        return control

    def accumulate_grads_(self, batch_size: int) -> None:
        super().accumulate_grads_(batch_size)
        self.batch_size = batch_size

    def take_group(self) -> tuple[dict, bool] | None:
        """The last round's gathered metadata and whether every live peer was in, if it was ok (once)."""
        group, self._last_round = self._last_round, None
        return group

    def step(self, *args: Any, **kwargs: Any):
        self._in_step = True  # step() resets the accumulators itself: that is not the end of an epoch
        try:
            return super().step(*args, **kwargs)
        finally:
            self._in_step = False

    def notify_used_averaged_gradients(self) -> None:
        super().notify_used_averaged_gradients()
        control, self._round = self._round, None
        if control is None or not control.triggered:
            self._record("local_only", 1)
            return
        try:
            gathered = control.result(timeout=0)
        except BaseException:  # hivemind logged why; the peer stepped with its local gradient
            self._record("failed", 1)
            return
        self._record("ok", len(gathered))
        asked = any(isinstance(g, dict) and g.get("resync") for g in gathered.values())
        live = max([g.get("live", 0) for g in gathered.values() if isinstance(g, dict)], default=0)
        # every member sees the same gathered metadata, so the whole group takes the same decision, and averages
        # its parameters in a group of the same size
        self.wants_state_averaging = asked or len(gathered) < live
        self._last_round = gathered, len(gathered) >= live
        if self.wants_state_averaging and self.on_state_group is not None:
            self.on_state_group(len(gathered))

    def reset_accumulated_grads_(self) -> None:
        super().reset_accumulated_grads_()
        if self._in_step:
            return
        if self.last_outcome is None:  # hivemind did not even start a round: nobody else was there
            self._record("local_only", 1)
        # the epoch's parameter-averaging decision has been taken; a drift shows in the next round's "resync"
        self.last_outcome, self.wants_state_averaging = None, False

    def _record(self, outcome: str, size: int) -> None:
        self.last_outcome, self.last_group_size, self._last_round = outcome, size, None
        self.rounds[outcome] += 1
        # parameters may have drifted from the others' unless this round averaged with a complete group
        self.resync_wanted = outcome != "ok"
        self.wants_state_averaging = outcome == "failed" or (outcome == "local_only" and self._wanted_group_size.value > 1)
        metrics.averaging_rounds.labels(self.run_id, outcome).inc()
        metrics.group_size.labels(self.run_id).set(size)
        if outcome == "ok":
            record_traffic(self.run_id, self.gradient_wire_bytes, size)
        if outcome == "failed":
            logger.warning("averaging round failed; stepped with the local gradient")

    @property
    def data_plane_fallbacks(self) -> int:
        return self._fallbacks.value

    @property
    def data_plane_builds(self) -> int:
        return self._builds.value

    def shutdown(self) -> None:
        self.watcher.stop()
        super().shutdown()
        if self._store is not None:
            self._store.close()
            self._store = None

    # ---- the averager's process: the all-reduce itself ----

    def _members(self, group_info: GroupInfo) -> tuple[list[tuple[bytes, dataplane.Endpoint]] | None, dict]:
        """(peer id, endpoint) of every member, or None when some member cannot use the data plane; and every
        member's gathered metadata by peer id (what the round returns), decoded once."""
        members: list[tuple[bytes, dataplane.Endpoint]] | None = []
        gathered = {}
        for peer_id, blob in zip(group_info.peer_ids, group_info.gathered):
            _bandwidth, mode, user = self.serializer.loads(blob)
            data = gathered[peer_id] = self.serializer.loads(user)
            endpoint = dataplane.Endpoint.from_wire(data.get("dp")) if isinstance(data, dict) else None
            if endpoint is None or AveragingMode(mode) != AveragingMode.NODE:
                members = None
            elif members is not None:
                members.append((peer_id.to_bytes(), endpoint))
        return members, gathered

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any):
        members, gathered = self._members(group_info) if self.data_plane_host is not None else (None, {})
        if members is None:
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="data-plane")  # collectives run in order
            self._groups = dataplane.GroupCache(self.data_plane_host, self._timeout)
        try:
            builds = self._groups.builds
            group, _rank = await loop.run_in_executor(
                self._executor, self._groups.get, members, self.peer_id.to_bytes(), group_info.group_id
            )
            self._builds.value += self._groups.builds - builds
            self._last_group.value = self._groups.current
        except Exception as err:
            # every member fails to rendezvous alike (same store, same timeout), so all fall back together
            self._groups.drop()
            self._last_group.value = 0
            self._fallbacks.value += 1
            logger.warning("data plane: process group not built (%s); using hivemind's all-reduce", err)
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        # hivemind registers each group for its own all-reduce runner, which this round does not use: mark it
        # settled, or hivemind warns that the group "did not finish"
        self._running_groups[group_info.group_id].cancel()
        async with enter_asynchronously(self.get_tensors()) as tensors:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(
                    self._executor, dataplane.average_, group, tensors, self._flat, kwargs["weight"], self.compression_name, self.codec
                )
            except Exception as err:
                self._groups.drop()
                self._last_group.value = 0  # the next group with this member builds a fresh process group
                raise MatchmakingException(f"data plane all-reduce failed: {err}") from None
            logger.debug("data plane all-reduce size=%d seconds=%.3f", len(members), time.perf_counter() - started)
        return gathered
