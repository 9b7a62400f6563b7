"""The embedded store: runs, peers, events and history in one SQLite file (WAL), for a coordinator without a database.

Each row holds the pydantic document as JSON (``encode``) plus the columns that are filtered or sorted on (times as integer
milliseconds since the epoch, UTC). One connection, guarded by a lock, serves every call; each call runs in a worker
thread (``asyncio.to_thread``) inside one transaction, so read-modify-write sequences are atomic and the event loop
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, TypeVar

from pydantic import BaseModel

from api.models import Event, Heartbeat, HistoryPoint, Peer, PeerStatus, Run, RunProgress, RunStatus
from api.store.base import MAX_LIMIT, Conflict, NotFound, Store, Unavailable, reported, stored, stored_time
from mesh.errors import ConfigError

T = TypeVar("T")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ENDED = ("stopped", "finished", "failed")
# Primary result codes that mean "the file cannot be used right now", not "the code is wrong".
UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_status_created ON runs (status, created_at);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, status TEXT NOT NULL,
    joined_at INTEGER NOT NULL, last_seen INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS peers_run_status ON peers (run_id, status);
CREATE INDEX IF NOT EXISTS peers_status_seen ON peers (status, last_seen);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, run_id TEXT, time INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_run_time ON events (run_id, time);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS run_history (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS run_history_run_epoch ON run_history (run_id, epoch);
"""


def ms(at: datetime) -> int:
    """Milliseconds since the epoch of ``stored_time(at)``: the sort and filter key for a time."""
    return (stored_time(at) - EPOCH) // timedelta(milliseconds=1)


def encode(model: BaseModel) -> str:
    """The document as JSON. Unlike ``model_dump_json`` this keeps NaN and infinite floats (as the JSON extensions NaN
    and Infinity, which pydantic reads back): a peer may report them, and null would not read back as a float."""
    return json.dumps(model.model_dump(), default=datetime.isoformat)


def page(limit: int, offset: int) -> tuple[int, int]:
    return max(0, min(limit, MAX_LIMIT)), max(0, offset)


class EmbeddedStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # plumbing
    def _connect(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: a power cut may lose the last commits, never the file
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _disconnect(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise Unavailable(f"embedded store {self.path} is not open")
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.to_thread(self._in_transaction, fn)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in UNAVAILABLE_CODES:  # extended code -> primary code
                raise Unavailable(f"embedded store {self.path}: {exc}") from exc
            raise

    # lifecycle
    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._connect)
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"cannot open embedded store {self.path}: {exc}") from exc
        except (sqlite3.DatabaseError, OSError) as exc:  # not a database file, or a folder we cannot create
            raise ConfigError(f"cannot use --db-path {self.path}: {exc}") from None

    async def close(self) -> None:
        await asyncio.to_thread(self._disconnect)

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    # runs
    async def create_run(self, run: Run) -> Run:
        run = stored(run)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO runs (run_id, status, created_at, doc) VALUES (?, ?, ?, ?)",
                    (run.run_id, run.status, ms(run.created_at), encode(run)),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"run {run.run_id} already exists") from exc

        await self._call(insert)
        return run

    async def get_run(self, run_id: str) -> Run:
        return await self._call(lambda conn: load_run(conn, run_id))

    async def list_runs(self, status: RunStatus | None, limit: int, offset: int) -> tuple[list[Run], int]:
        limit, offset = page(limit, offset)
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())

        def select(conn: sqlite3.Connection) -> tuple[list[Run], int]:
            rows = conn.execute(
                f"SELECT doc FROM runs {where} ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
            (total,) = conn.execute(f"SELECT COUNT(*) FROM runs {where}", args).fetchone()
            return [Run.model_validate_json(doc) for (doc,) in rows], total

        return await self._call(select)

    async def set_run_status(self, run_id: str, status: RunStatus, at: datetime) -> Run:
        at = stored_time(at)

        def change(conn: sqlite3.Connection) -> Run:
            run = load_run(conn, run_id)
            if run.status in ENDED:
                if run.status == status:
                    return run
                raise Conflict(f"run {run_id} is {run.status}; it cannot become {status}")
            update: dict = {"status": status, "updated_at": at}
            if status in ENDED:
                update["stopped_at"] = at
            return save_run(conn, run.model_copy(update=update))

        return await self._call(change)

    async def update_run_progress(self, run_id: str, progress: RunProgress, at: datetime) -> Run:
        at = stored_time(at)

        def change(conn: sqlite3.Connection) -> Run:
            run = load_run(conn, run_id)
            status = "running" if run.status == "created" else run.status
            return save_run(conn, run.model_copy(update={"progress": progress, "updated_at": at, "status": status}))

        return await self._call(change)

    # history
    async def add_history(self, point: HistoryPoint) -> bool:
        point = stored(point)

        def insert(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO run_history (run_id, epoch, doc) VALUES (?, ?, ?) ON CONFLICT (run_id, epoch) DO NOTHING",
                (point.run_id, point.epoch, encode(point)),
            )
            return cursor.rowcount == 1

        return await self._call(insert)

    async def history_epochs(self, run_id: str) -> list[int]:
        def select(conn: sqlite3.Connection) -> list[int]:
            return [
                epoch for (epoch,) in conn.execute("SELECT epoch FROM run_history WHERE run_id = ? ORDER BY epoch", (run_id,)).fetchall()
            ]

        return await self._call(select)

    async def history_at(self, run_id: str, epochs: list[int]) -> list[HistoryPoint]:
        def select(conn: sqlite3.Connection) -> list[HistoryPoint]:
            docs = []
            for start in range(0, len(epochs), 900):  # SQLite's bound parameters per statement: keep well under
                chunk = epochs[start : start + 900]
                docs += conn.execute(
                    f"SELECT epoch, doc FROM run_history WHERE run_id = ? AND epoch IN ({','.join('?' * len(chunk))})",
                    (run_id, *chunk),
                ).fetchall()
            return [HistoryPoint.model_validate_json(doc) for _epoch, doc in sorted(docs)]

        return await self._call(select)

    # peers
    async def heartbeat(self, peer_id: str, beat: Heartbeat, at: datetime, source: str = "heartbeat") -> tuple[Peer, bool]:
        at = stored_time(at)

        def upsert(conn: sqlite3.Connection) -> tuple[Peer, bool]:
            row = conn.execute("SELECT doc FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            old = Peer.model_validate_json(row[0]) if row else None
            joined_at = old.joined_at if old is not None and old.status == "alive" else None
            peer = Peer(
                peer_id=peer_id,
                **reported(beat),
                status="alive",
                source=source,
                joined_at=joined_at or at,
                last_seen=at,
                left_at=None,
            )
            return save_peer(conn, peer), joined_at is None

        return await self._call(upsert)

    async def get_peer(self, peer_id: str) -> Peer:
        return await self._call(lambda conn: load_peer(conn, peer_id))

    async def list_peers(self, run_id: str | None, status: PeerStatus | None, limit: int, offset: int) -> tuple[list[Peer], int]:
        limit, offset = page(limit, offset)
        clauses = [(column, value) for column, value in (("run_id", run_id), ("status", status)) if value is not None]
        where = ("WHERE " + " AND ".join(f"{column} = ?" for column, _ in clauses)) if clauses else ""
        args = tuple(value for _, value in clauses)

        def select(conn: sqlite3.Connection) -> tuple[list[Peer], int]:
            rows = conn.execute(
                f"SELECT doc FROM peers {where} ORDER BY joined_at, peer_id LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
            (total,) = conn.execute(f"SELECT COUNT(*) FROM peers {where}", args).fetchone()
            return [Peer.model_validate_json(doc) for (doc,) in rows], total

        return await self._call(select)

    async def leave(self, peer_id: str, at: datetime) -> Peer:
        at = stored_time(at)

        def change(conn: sqlite3.Connection) -> Peer:
            peer = load_peer(conn, peer_id)
            return save_peer(conn, peer.model_copy(update={"status": "left", "left_at": at}))

        return await self._call(change)

    async def mark_lost(self, seen_before: datetime, at: datetime) -> list[Peer]:
        cutoff, at = ms(seen_before), stored_time(at)

        def change(conn: sqlite3.Connection) -> list[Peer]:
            rows = conn.execute(
                "SELECT doc FROM peers WHERE status = 'alive' AND last_seen < ? ORDER BY joined_at, peer_id", (cutoff,)
            ).fetchall()
            lost = [Peer.model_validate_json(doc).model_copy(update={"status": "lost", "left_at": at}) for (doc,) in rows]
            return [save_peer(conn, peer) for peer in lost]

        return await self._call(change)

    async def count_peers(self) -> dict[tuple[str, str], int]:
        def select(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = conn.execute("SELECT run_id, status, COUNT(*) FROM peers GROUP BY run_id, status").fetchall()
            return {(run_id, status): count for run_id, status, count in rows}

        return await self._call(select)

    # events
    async def add_event(self, event: Event) -> None:
        event = stored(event)
        await self._call(
            lambda conn: conn.execute(
                "INSERT INTO events (event_id, run_id, time, doc) VALUES (?, ?, ?, ?)",
                (event.event_id, event.run_id, ms(event.time), encode(event)),
            )
        )

    async def list_events(self, run_id: str | None, limit: int, offset: int) -> tuple[list[Event], int]:
        limit, offset = page(limit, offset)
        where, args = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())

        def select(conn: sqlite3.Connection) -> tuple[list[Event], int]:
            rows = conn.execute(
                f"SELECT doc FROM events {where} ORDER BY time DESC, seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
            (total,) = conn.execute(f"SELECT COUNT(*) FROM events {where}", args).fetchone()
            return [Event.model_validate_json(doc) for (doc,) in rows], total

        return await self._call(select)


def load_run(conn: sqlite3.Connection, run_id: str) -> Run:
    row = conn.execute("SELECT doc FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFound(f"run {run_id} not found")
    return Run.model_validate_json(row[0])


def save_run(conn: sqlite3.Connection, run: Run) -> Run:
    conn.execute(
        "UPDATE runs SET status = ?, created_at = ?, doc = ? WHERE run_id = ?",
        (run.status, ms(run.created_at), encode(run), run.run_id),
    )
    return run


def load_peer(conn: sqlite3.Connection, peer_id: str) -> Peer:
    row = conn.execute("SELECT doc FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is None:
        raise NotFound(f"peer {peer_id} not found")
    return Peer.model_validate_json(row[0])


def save_peer(conn: sqlite3.Connection, peer: Peer) -> Peer:
    conn.execute(
        "INSERT INTO peers (peer_id, run_id, status, joined_at, last_seen, doc) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (peer_id) DO UPDATE SET run_id = excluded.run_id, status = excluded.status, "
        "joined_at = excluded.joined_at, last_seen = excluded.last_seen, doc = excluded.doc",
        (peer.peer_id, peer.run_id, peer.status, ms(peer.joined_at), ms(peer.last_seen), encode(peer)),
    )
    return peer
