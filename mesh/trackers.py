"""Experiment trackers (``--tracker csv|tensorboard|wandb``): one record per global epoch of what this peer saw
(training loss, held-out loss, lr, the run's samples/s, the round's group and outcomes), written as the epoch ends.

A tracker that fails to write costs one WARNING line and is closed; training goes on. ``tensorboard`` needs the
``tensorboard`` package (``pip install 'mesh[tensorboard]'``), ``wandb`` the ``wandb`` package (configured by its
own environment: ``WANDB_MODE``, ``WANDB_API_KEY``); asking for one that is not installed is one line at start.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from mesh.config import TRACKERS
from mesh.errors import ConfigError

logger = logging.getLogger(__name__)

FIELDS = ("epoch", "loss", "eval_loss", "lr", "samples_per_second", "group", "rounds_ok", "rounds_failed")


class Tracker(Protocol):
    def log(self, row: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class CsvTracker:
    """``metrics.csv`` in the tracker folder: a header, then a row per epoch (empty cells for unknown values)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "metrics.csv"
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        if new:
            self._writer.writeheader()

    def log(self, row: dict[str, float]) -> None:
        self._writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    """TensorBoard event files in the tracker folder: one scalar per field, the epoch as the step."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tracker tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._writer = SummaryWriter(log_dir=str(directory))

    def log(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != "epoch" and math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=int(row["epoch"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, directory: Path, run_id: str, peer_id: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--tracker wandb needs the wandb package: pip install wandb") from None
        self._run = wandb.init(project=run_id, name=peer_id, dir=str(directory), reinit=True)

    def log(self, row: dict[str, float]) -> None:
        self._run.log({k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}, step=int(row["epoch"]))

    def close(self) -> None:
        self._run.finish()


def open_trackers(names: tuple[str, ...], directory: Path, run_id: str, peer_id: str) -> list[Any]:
    directory.mkdir(parents=True, exist_ok=True)
    opened: list[Any] = []
    for name in dict.fromkeys(names):
        if name == "csv":
            opened.append(CsvTracker(directory))
        elif name == "tensorboard":
            opened.append(TensorBoardTracker(directory))
        elif name == "wandb":
            opened.append(WandbTracker(directory, run_id, peer_id))
        else:
            raise ConfigError(f"--tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    return opened


class Trackers:
    """The peer's trackers: each gets every epoch's row; one that fails is closed and dropped, with a WARNING."""

    def __init__(self, trackers: list[Any]) -> None:
        self._trackers = list(trackers)

    def log(self, row: dict[str, float]) -> None:
        for tracker in list(self._trackers):
            try:
                tracker.log(row)
            except Exception as err:  # noqa: BLE001 - a full disk or a tracker's service must not stop training
                logger.warning("tracker %s failed and is closed: %s", type(tracker).__name__, " ".join(str(err).split()))
                self._trackers.remove(tracker)
                self._close(tracker)

    def close(self) -> None:
        for tracker in self._trackers:
            self._close(tracker)
        self._trackers = []

    @staticmethod
    def _close(tracker: Any) -> None:
        try:
            tracker.close()
        except Exception:  # noqa: BLE001
            pass
