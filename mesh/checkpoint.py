"""Local checkpoints: written atomically (temp file, fsync, rename), the newest one loaded at start.

A checkpoint that cannot be read (truncated, overwritten, from an incompatible torch) is moved aside, never deleted
and never overwritten by the next save: :class:`UnreadableCheckpoint` says where it went, and the caller decides
whether the live mesh can provide the state instead."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mesh import atomicfile
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
    return atomicfile.write(directory / FILENAME, lambda handle: torch.save(state, handle), durable=True, mode=0o600)


class UnreadableCheckpoint(Exception):
    """The checkpoint could not be read; it was renamed to ``moved_to``."""

    def __init__(self, path: Path, moved_to: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} cannot be read ({reason}); moved it to {moved_to}")
        self.path, self.moved_to, self.reason = path, moved_to, reason


def load(directory: Path) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or None when there is none. Raises :class:`UnreadableCheckpoint` (after
    moving the file aside) when there is one that cannot be read."""
    target = directory / FILENAME
    if not target.exists():
        return None
    try:
        # weights_only: a checkpoint from elsewhere must not run code (plain containers, tensors and numbers only)
        state = torch.load(target, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint")
        return state
    except Exception as err:
        moved = target.with_name(f"{FILENAME}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.replace(target, moved)
        except OSError as move_err:
            raise ConfigError(
                f"checkpoint {target} cannot be read ({err}) nor moved aside ({move_err.strerror}); move it away to start fresh"
            ) from None
        raise UnreadableCheckpoint(target, moved, str(err).splitlines()[0] if str(err) else type(err).__name__) from None
