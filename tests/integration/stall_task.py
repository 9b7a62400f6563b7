"""The regression task, whose batches stall while a file exists (its path in ``TEST_STALL_FILE``): a straggler
whose training loop waits while its helpers (progress reports, averagers) stay up, as a slow step or a slow data
loader would. For tests/integration/test_training.py (the run's end with a member behind)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from mesh.tasks import regression
from mesh.tasks.base import Task

MAX_STALL = 60.0  # seconds: a stall file left behind never hangs a test for longer


def task() -> Task:
    base = regression.regression_task()
    stall = os.environ.get("TEST_STALL_FILE")

    def make_batches(batch_size: int, seed: int):
        for batch in base.make_batches(batch_size, seed):
            deadline = time.monotonic() + MAX_STALL
            while stall and Path(stall).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            yield batch

    return dataclasses.replace(base, name="regression-stall", make_batches=make_batches)
