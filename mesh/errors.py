"""User-facing errors: each carries one line that says what went wrong and what to do."""

from __future__ import annotations


class MeshError(Exception):
    """A mistake the user can fix. The CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code: int = 2


class ConfigError(MeshError):
    """A flag, environment variable or config file value is invalid."""


class JoinError(MeshError):
    """The DHT could not be joined (bad address, nobody answering, port taken)."""

    exit_code = 3


class RunError(MeshError):
    """The run does not exist or does not match this peer's task."""

    exit_code = 4
