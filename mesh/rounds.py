"""Timing and traffic of gradient averaging rounds, observed from outside hivemind.

hivemind runs each round in its averager process and shares only a ``StepControl`` whose ``stage`` lives in
shared memory. A small thread polls the stage of the current round every 20 ms: the time from the round's start
to ``AWAITING_TRIGGER`` is matchmaking, from ``RUNNING_ALLREDUCE`` to done is the all-reduce. Polling costs
nothing measurable and is accurate to the poll period.
"""

from __future__ import annotations

import threading
import time

import torch
from hivemind.averaging.control import AveragingStage, StepControl

from mesh import metrics

POLL_SECONDS = 0.02


class RoundWatcher(threading.Thread):
    def __init__(self, run: str) -> None:
        super().__init__(name="round-watcher", daemon=True)
        self.run_label = run
        self._lock = threading.Lock()
        self._control: StepControl | None = None
        self._round_start = self._round_matched = self._round_reducing = 0.0
        self._halt = threading.Event()

    def watch(self, control: StepControl) -> None:
        with self._lock:
            if control is self._control:
                return
            self._control, self._round_start, self._round_matched, self._round_reducing = control, time.perf_counter(), 0.0, 0.0

    def run(self) -> None:
        while not self._halt.wait(POLL_SECONDS):
            with self._lock:
                control = self._control
                if control is None:
                    continue
                now = time.perf_counter()
                try:
                    stage, done = control.stage, control.done()
                except Exception:  # shared memory released at shutdown
                    self._control = None
                    continue
                if done and (control.cancelled() or control.exception() is not None):
                    self._control = None  # a failed round: FINISHED is set on failure too, so it says nothing here
                    continue
                if not self._round_matched and stage.value >= AveragingStage.AWAITING_TRIGGER.value:
                    self._round_matched = now
                    metrics.matchmaking_duration.labels(self.run_label).observe(now - self._round_start)
                if not self._round_reducing and stage.value >= AveragingStage.RUNNING_ALLREDUCE.value:
                    self._round_reducing = now
                if done:
                    if self._round_reducing:
                        metrics.allreduce_duration.labels(self.run_label).observe(now - self._round_reducing)
                    self._control = None

    def stop(self) -> None:
        self._halt.set()


def wire_bytes(parameters: list[torch.Tensor], compression: str, eight_bit_min_size: int) -> int:
    """Bytes one copy of the gradients takes on the wire with this compression."""
    total = 0
    for tensor in parameters:
        n = tensor.numel()
        if compression == "none":
            total += n * 4
        elif compression == "fp16" or n < eight_bit_min_size:
            total += n * 2
        else:
            total += n + 256 * 4  # one byte per value plus the codebook
    return total


def record_traffic(run: str, gradient_bytes: int, group: int) -> None:
    """Butterfly all-reduce: each peer sends its n-1 foreign parts and the n-1 copies of its averaged part, and
    receives as much: 2 * (n-1)/n of the gradients each way."""
    if group < 2:
        return
    moved = int(2 * gradient_bytes * (group - 1) / group)
    metrics.averaging_sent_bytes.labels(run).inc(moved)
    metrics.averaging_received_bytes.labels(run).inc(moved)
