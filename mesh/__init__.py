"""mesh: a peer-to-peer training mesh on hivemind's DHT.

``mesh.join(...)`` makes this process a peer of a run, in the user's own training loop (mesh/session.py). It is
imported on first use, so that ``import mesh`` (and ``mesh --help``) imports no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def join(*args: Any, **kwargs: Any) -> Any:
    """Join a run as a peer: see :func:`mesh.session.join`."""
    from mesh.session import join as _join

    return _join(*args, **kwargs)
