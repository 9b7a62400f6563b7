"""Local checkpoints: written atomically (temp file, fsync, rename), the newest one loaded at start."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mesh.errors import ConfigError

logger = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"


def ensure_writable(directory: Path) -> Path:
    """Create the folder and prove we can write there, before any training time is spent."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"checkpoint directory {directory} is not writable: {err.strerror or err}") from None
    return directory


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` so that a crash at any moment leaves either the old or the new checkpoint, never half of one."""
    target = directory / FILENAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(directory: Path) -> dict[str, Any] | None:
    target = directory / FILENAME
    if not target.exists():
        return None
    try:
        return torch.load(target, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"checkpoint {target} cannot be read ({err}); move it away to start fresh") from None
