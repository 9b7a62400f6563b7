"""The store interface the coordinator's handlers use. Both implementations pass ``tests/contract``."""

from __future__ import annotations

import abc
from datetime import datetime, timezone
from typing import TypeVar

from pydantic import BaseModel

from api.models import Event, Heartbeat, HistoryPoint, Peer, PeerStatus, Run, RunProgress, RunStatus

MAX_LIMIT = 500  # page size cap for every list
M = TypeVar("M", bound=BaseModel)


def stored_time(at: datetime) -> datetime:
    """``at`` as every store keeps it: tz-aware UTC, whole milliseconds (a BSON date holds milliseconds, so both stores
    round the same way and answer the same). A naive datetime is taken as UTC."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def stored(model: M) -> M:
    """``model`` with each top-level datetime field as ``stored_time`` gives it."""
    return model.model_copy(update={name: stored_time(v) for name, v in model if isinstance(v, datetime)})


def spread(items: list[int], limit: int) -> list[int]:
    """At most ``limit`` of ``items``, evenly spaced by position, the first and the last always among them."""
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[-1]]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def reported(beat: Heartbeat) -> dict:
    """The heartbeat's fields that the peer record keeps (``task`` is for the handler, not the peer)."""
    return beat.model_dump(include=set(Peer.model_fields))


class StoreError(Exception):
    """Base of the store's domain errors; handlers map them to HTTP errors."""


class NotFound(StoreError):
    """The run or peer does not exist (404)."""


class Conflict(StoreError):
    """The write contradicts what is stored: a duplicate run id, a transition that is not allowed (409)."""


class Unavailable(StoreError):
    """The database cannot be reached right now (503). Nothing was written."""


class Store(abc.ABC):
    """Runs, peers, events and per-epoch history. Every method is a coroutine; none blocks the event loop.

    Times are stored as ``stored_time`` gives them; what a write returns equals what a later read returns."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create indexes/tables. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise Unavailable when the database cannot answer (readiness)."""

    # runs
    @abc.abstractmethod
    async def create_run(self, run: Run) -> Run:
        """Insert; Conflict when the run id exists."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run:
        """NotFound when missing."""

    @abc.abstractmethod
    async def list_runs(self, status: RunStatus | None, limit: int, offset: int) -> tuple[list[Run], int]:
        """Newest first (created_at descending); returns (page, total matching)."""

    @abc.abstractmethod
    async def set_run_status(self, run_id: str, status: RunStatus, at: datetime) -> Run:
        """Change status (and stopped_at for stopped/finished/failed). NotFound; Conflict when the run already ended
        (stopped, finished, failed) and ``status`` differs."""

    @abc.abstractmethod
    async def update_run_progress(self, run_id: str, progress: RunProgress, at: datetime) -> Run:
        """Replace the progress block; a run in ``created`` becomes ``running``. NotFound."""

    # history
    @abc.abstractmethod
    async def add_history(self, point: HistoryPoint) -> bool:
        """Insert one point per (run_id, epoch); False (no error) when that epoch is already recorded."""

    async def list_history(self, run_id: str, limit: int) -> list[HistoryPoint]:
        """At most ``limit`` points spread evenly over the whole run, ascending by epoch, its first and last epochs
        included: what a chart of the run needs, however long the run (every point when it has no more)."""
        epochs = await self.history_epochs(run_id)
        return await self.history_at(run_id, spread(epochs, limit)) if epochs and limit > 0 else []

    @abc.abstractmethod
    async def history_epochs(self, run_id: str) -> list[int]:
        """Every recorded epoch of the run, ascending."""

    @abc.abstractmethod
    async def history_at(self, run_id: str, epochs: list[int]) -> list[HistoryPoint]:
        """The run's points at ``epochs``, ascending by epoch."""

    # peers
    @abc.abstractmethod
    async def heartbeat(self, peer_id: str, beat: Heartbeat, at: datetime, source: str = "heartbeat") -> tuple[Peer, bool]:
        """Idempotent upsert: status becomes alive, last_seen = at, joined_at set on first sight (or when the peer was
        left/lost before). Returns (peer, newly_joined)."""

    @abc.abstractmethod
    async def get_peer(self, peer_id: str) -> Peer:
        """NotFound when missing."""

    @abc.abstractmethod
    async def list_peers(self, run_id: str | None, status: PeerStatus | None, limit: int, offset: int) -> tuple[list[Peer], int]:
        """Ordered by joined_at ascending, then peer_id."""

    @abc.abstractmethod
    async def leave(self, peer_id: str, at: datetime) -> Peer:
        """Graceful leave: status left, left_at = at. NotFound."""

    @abc.abstractmethod
    async def mark_lost(self, seen_before: datetime, at: datetime) -> list[Peer]:
        """Every alive peer whose last_seen < seen_before becomes lost (left_at = at); returns them."""

    @abc.abstractmethod
    async def count_peers(self) -> dict[tuple[str, str], int]:
        """{(run_id, status): count} for metrics and summaries."""

    # events
    @abc.abstractmethod
    async def add_event(self, event: Event) -> None: ...

    @abc.abstractmethod
    async def list_events(self, run_id: str | None, limit: int, offset: int) -> tuple[list[Event], int]:
        """Newest first."""
