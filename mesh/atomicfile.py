"""Files that readers see whole or not at all: write a temp file in the same folder, then rename it over the target.

Other processes poll some of these files (``mesh up`` reads the coordinator's and the bootstrap's address files as
soon as they exist; ``mesh up`` and the tests read status files), so a plain ``write_text`` can hand them an empty or
half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write(path: Path, content: str | bytes | Callable[[BinaryIO], object], durable: bool = False, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``content`` (text, bytes, or a function that writes to a binary handle) in one rename.
    ``durable``: fsync the file and its folder, so that a machine crash leaves the old or the new file (checkpoints).
    ``mode``: the file's permissions (mkstemp's are 0600; status and address files are read by other users, e.g. a
    sidecar on a shared volume). A failure at any point leaves the previous file as it was and no temp file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
