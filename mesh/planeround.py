"""A gradient round on the data plane, as the handle hivemind.Optimizer holds.

hivemind.Optimizer drives a round through a :class:`~hivemind.averaging.control.StepControl`: it schedules one
ahead of the epoch's end, sets its ``weight``, calls ``allow_allreduce()`` (the trigger), waits on ``result()``,
and may ``cancel()`` it or tag along with weight 0. :class:`PlaneRound` offers the same surface and runs the round
in the *training* process: after the trigger, its ``work`` (a function of the round) runs on the data plane's one
thread, and its result or error becomes the round's. ``inner`` is hivemind's own control when the round's group
comes from hivemind's matchmaking (the averager's process finds the group, the training process moves the
tensors); a round in a standing group has none (no matchmaking at all).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from hivemind.averaging.control import AveragingStage, StepControl


class PlaneRound:
    def __init__(self, work: Callable[["PlaneRound"], Any], executor: ThreadPoolExecutor, inner: StepControl | None = None) -> None:
        self.work: Callable[[PlaneRound], Any] | None = work
        self.inner, self._executor = inner, executor
        self._future: Future = Future()
        self._weight = 0.0
        self._triggered = False
        self.reducing = False  # set by ``work`` once the tensors move
        self.group: Any = None  # set by ``work`` when the round ran on the data plane: (gloo group, NCCL group, members)
        # set when the accumulated gradients are to be loaded by ``work`` itself (scaled by its share), not before
        # the trigger: 1 / the number of accumulation steps
        self.load_scale: float | None = None

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = float(value)
        if self.inner is not None:
            self.inner.weight = value

    @property
    def triggered(self) -> bool:
        return self._triggered

    def allow_allreduce(self) -> None:
        if self._triggered:
            return
        self._triggered = True
        if self.inner is not None:
            self.inner.allow_allreduce()
        self._executor.submit(self._run)

    def _run(self) -> None:
        if not self._future.set_running_or_notify_cancel():
            return
        work, self.work = self.work, None  # holds a process group: let it go with the round's last user
        try:
            result = work(self)
        except BaseException as err:  # the round failed: hivemind steps with the local gradient
            self._future.set_exception(err)
        else:
            self._future.set_result(result)

    def cancel(self) -> bool:
        if self.inner is not None:
            self.inner.cancel()
        return self._future.cancel()  # only a round that has not begun its work can be cancelled

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    @property
    def stage(self) -> AveragingStage:
        if self._future.done():
            return AveragingStage.FINISHED
        if self.reducing:
            return AveragingStage.RUNNING_ALLREDUCE
        if self.inner is not None:
            stage = self.inner.stage
            # hivemind's part ends once the group is found; the tensors then move here
            return AveragingStage.RUNNING_ALLREDUCE if stage == AveragingStage.FINISHED else stage
        return AveragingStage.RUNNING_ALLREDUCE if self._triggered else AveragingStage.AWAITING_TRIGGER
