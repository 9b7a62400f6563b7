"""The mesh's progress tracker: hivemind's, with progress reports throttled and the epoch's end planned.

hivemind's :class:`~hivemind.optim.progress_tracker.ProgressTracker` says when this peer's epoch is over
(``ready_to_update_epoch``) from its estimate of the swarm's samples. :class:`MeshProgressTracker` adds a plan
(:mod:`mesh.epochplan`): after a complete round, the group's members agree on how many local samples each
contributes to the next epoch, and a peer ends that epoch when it has them, so the group's members arrive at the
next round together. The estimate still decides whenever there is no plan for the current epoch, and hivemind's
other rule (someone is already in a later epoch: follow) always applies.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, get_dht_time


class ReportThrottle(threading.Event):
    """Stands in for the progress tracker's "report now" event: hivemind sets it after every local step, and each
    set becomes a DHT store (through the DHT process and the libp2p daemon, to every node holding the key). At tens
    of steps a second that is most of the helpers' CPU. Waking at most every ``period`` seconds loses nothing: the
    reporter sends the newest progress when it wakes, and peers extrapolate between reports from samples/s."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period, self._last = period, 0.0

    def wait(self, timeout: float | None = None) -> bool:
        pause = self._last + self.period - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, timeout) if timeout is not None else pause)
            timeout = None if timeout is None else max(0.0, timeout - pause)
        woken = super().wait(timeout)
        self._last = time.monotonic()
        return woken


class MeshProgressTracker(ProgressTracker):
    def __init__(self, *, report_period: float, start: bool = True, **kwargs: Any) -> None:
        super().__init__(start=False, **kwargs)
        self.should_report_progress = ReportThrottle(report_period)  # before the reporter thread first waits on it
        # (epoch, local samples that end it, members planned for), set after a complete round
        self.plan: tuple[int, int, int] | None = None
        if start:
            self.start()

    def plan_epoch(self, epoch: int, samples: int, members: int) -> None:
        self.plan = (epoch, samples, members)

    def has_plan(self, epoch: int) -> bool:
        return self.plan is not None and self.plan[0] == epoch

    def _planned_samples(self) -> int | None:
        """This peer's share of the current epoch, if there is a plan for it, no peer is already past it, and no
        peer has come that the plan did not count (a newcomer's samples count only in hivemind's estimate)."""
        plan, epoch = self.plan, self.local_progress.epoch
        if plan is None or not self.has_plan(epoch) or self.global_epoch > epoch or self.global_progress.num_peers > plan[2]:
            return None
        return plan[1]

    @property
    def ready_to_update_epoch(self) -> bool:
        planned = self._planned_samples()
        if planned is None:
            return super().ready_to_update_epoch
        return self.local_progress.samples_accumulated >= planned

    @property
    def estimated_next_update_time(self) -> float:  # when to begin matchmaking (hivemind pre-schedules from it)
        planned = self._planned_samples()
        if planned is None:
            return super().estimated_next_update_time
        remaining = planned - self.local_progress.samples_accumulated
        return get_dht_time() + max(0, remaining) / self.performance_ema.samples_per_second

    def refresh(self) -> None:
        """Re-read the swarm's progress from the DHT now, not on the fetcher's own schedule."""
        self.global_progress.next_fetch_time = 0.0
        self.global_state_updated.set()

    def others_epochs(self) -> list[int]:
        """The epoch of every other peer that reports progress in the run now (read from the DHT, not cached)."""
        found = self.dht.get(self.training_progress_key, latest=True)
        records = found.value if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict) else {}
        mine = self.local_progress.peer_id
        epochs = []
        for record in records.values():
            try:
                progress = LocalTrainingProgress.parse_obj(record.value)
            except Exception:  # a malformed record (another version, a faulty peer) is not a peer here
                continue
            if progress.peer_id != mine:
                epochs.append(progress.epoch)
        return epochs
