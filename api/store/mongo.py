"""The MongoDB store: runs, peers, events and history as documents, through PyMongo's asyncio client.

The only module that imports pymongo. It owns the collections and their indexes and maps driver errors to the store's:
a duplicate key is a Conflict, a database that cannot be reached (within ``timeout_ms``) is Unavailable. The client
reconnects by itself once the server is back; nothing here remembers an outage.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, ConnectionFailure, DuplicateKeyError, OperationFailure

from api.models import Event, Heartbeat, HistoryPoint, Peer, PeerStatus, Run, RunProgress, RunStatus
from api.store.base import MAX_LIMIT, Conflict, NotFound, Store, Unavailable, reported, stored, stored_time
from mesh.errors import ConfigError

Doc = dict[str, Any]
AFTER = ReturnDocument.AFTER
ENDED = ["stopped", "finished", "failed"]
INDEXES: dict[str, list[tuple[list[tuple[str, int]], bool]]] = {  # collection -> [(keys, unique)]
    "runs": [
        ([("run_id", ASCENDING)], True),
        ([("status", ASCENDING), ("created_at", DESCENDING)], False),
        ([("created_at", DESCENDING)], False),
    ],
    "peers": [
        ([("peer_id", ASCENDING)], True),
        ([("run_id", ASCENDING), ("status", ASCENDING)], False),
        ([("status", ASCENDING), ("last_seen", ASCENDING)], False),
    ],
    "events": [([("run_id", ASCENDING), ("time", DESCENDING)], False), ([("time", DESCENDING)], False)],
    "run_history": [([("run_id", ASCENDING), ("epoch", ASCENDING)], True)],
}
RUN_ORDER = [("created_at", DESCENDING), ("_id", ASCENDING)]
PEER_ORDER = [("joined_at", ASCENDING), ("_id", ASCENDING)]
EVENT_ORDER = [("time", DESCENDING), ("_id", DESCENDING)]  # ObjectIds grow: the later insert first on a tie


def redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def page(limit: int, offset: int) -> tuple[int, int]:
    return max(0, min(limit, MAX_LIMIT)), max(0, offset)


class MongoStore(Store):
    def __init__(self, url: str, database: str = "mesh", timeout_ms: int = 2000) -> None:
        self.url = url
        self.database = database
        self.timeout_ms = timeout_ms
        self._client: AsyncMongoClient[Doc] | None = None

    @asynccontextmanager
    async def _db(self) -> AsyncIterator[AsyncDatabase[Doc]]:
        if self._client is None:
            raise Unavailable("mongo store is not open")
        try:
            yield self._client[self.database]
        except DuplicateKeyError as exc:
            raise Conflict(f"duplicate key: {exc.details.get('keyValue') if exc.details else exc}") from exc
        except ConnectionFailure as exc:  # AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError, ...
            raise Unavailable(f"mongodb at {redact(self.url)} is unreachable ({type(exc).__name__})") from exc

    # lifecycle
    async def open(self) -> None:
        if self._client is None:
            try:
                self._client = AsyncMongoClient(
                    self.url,
                    tz_aware=True,
                    tzinfo=timezone.utc,
                    serverSelectionTimeoutMS=self.timeout_ms,
                    connectTimeoutMS=self.timeout_ms,
                    socketTimeoutMS=self.timeout_ms,
                )
            except (ConfigurationError, ValueError) as exc:  # a malformed URL or option, a DNS name that does not resolve
                raise ConfigError(f"--mongo-url is not usable: {exc}") from None
        try:
            async with self._db() as db:
                for name, indexes in INDEXES.items():
                    for keys, unique in indexes:
                        await db[name].create_index(keys, unique=unique)
        except OperationFailure as exc:  # typically wrong credentials or missing rights
            raise ConfigError(f"MongoDB refused the coordinator: {exc.details or exc}") from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def ping(self) -> None:
        async with self._db() as db:
            await db.command("ping")

    # runs
    async def create_run(self, run: Run) -> Run:
        run = stored(run)
        try:
            async with self._db() as db:
                await db.runs.insert_one({"_id": run.run_id, **run.model_dump()})
        except Conflict as exc:
            raise Conflict(f"run {run.run_id} already exists") from exc
        return run

    async def get_run(self, run_id: str) -> Run:
        async with self._db() as db:
            return as_run(await db.runs.find_one({"_id": run_id}), run_id)

    async def list_runs(self, status: RunStatus | None, limit: int, offset: int) -> tuple[list[Run], int]:
        query = {"status": status} if status is not None else {}
        async with self._db() as db:
            docs, total = await find_page(db.runs, query, RUN_ORDER, limit, offset)
        return [as_run(doc, "") for doc in docs], total

    async def set_run_status(self, run_id: str, status: RunStatus, at: datetime) -> Run:
        at = stored_time(at)
        update: Doc = {"status": status, "updated_at": at} | ({"stopped_at": at} if status in ENDED else {})
        async with self._db() as db:
            doc = await db.runs.find_one_and_update({"_id": run_id, "status": {"$nin": ENDED}}, {"$set": update}, return_document=AFTER)
            if doc is not None:
                return as_run(doc, run_id)
            run = as_run(await db.runs.find_one({"_id": run_id}), run_id)
        if run.status != status:
            raise Conflict(f"run {run_id} is {run.status}; it cannot become {status}")
        return run

    async def update_run_progress(self, run_id: str, progress: RunProgress, at: datetime) -> Run:
        update: Doc = {"progress": progress.model_dump(), "updated_at": stored_time(at)}
        async with self._db() as db:
            doc = await db.runs.find_one_and_update(
                {"_id": run_id, "status": "created"}, {"$set": update | {"status": "running"}}, return_document=AFTER
            )
            if doc is None:
                doc = await db.runs.find_one_and_update({"_id": run_id}, {"$set": update}, return_document=AFTER)
        return as_run(doc, run_id)

    # history
    async def add_history(self, point: HistoryPoint) -> bool:
        try:
            async with self._db() as db:
                await db.run_history.insert_one(stored(point).model_dump())
        except Conflict:
            return False
        return True

    async def history_epochs(self, run_id: str) -> list[int]:
        async with self._db() as db:
            cursor = db.run_history.find({"run_id": run_id}, {"_id": 0, "epoch": 1}).sort("epoch", ASCENDING)
            return [doc["epoch"] for doc in await cursor.to_list()]

    async def history_at(self, run_id: str, epochs: list[int]) -> list[HistoryPoint]:
        if not epochs:
            return []
        async with self._db() as db:
            cursor = db.run_history.find({"run_id": run_id, "epoch": {"$in": list(epochs)}}, {"_id": 0}).sort("epoch", ASCENDING)
            docs = await cursor.to_list()
        return [HistoryPoint.model_validate(doc) for doc in docs]

    # peers
    async def heartbeat(self, peer_id: str, beat: Heartbeat, at: datetime, source: str = "heartbeat") -> tuple[Peer, bool]:
        at = stored_time(at)
        fresh = Peer(peer_id=peer_id, **reported(beat), source=source, joined_at=at, last_seen=at).model_dump()
        seen = {key: value for key, value in fresh.items() if key not in ("joined_at", "left_at")}
        async with self._db() as db:
            for _ in range(3):
                doc = await db.peers.find_one_and_update({"_id": peer_id, "status": "alive"}, {"$set": seen}, return_document=AFTER)
                if doc is not None:
                    return as_peer(doc, peer_id), False
                try:
                    doc = await db.peers.find_one_and_update(
                        {"_id": peer_id, "status": {"$ne": "alive"}}, {"$set": fresh}, upsert=True, return_document=AFTER
                    )
                    return as_peer(doc, peer_id), True
                except DuplicateKeyError:
                    continue  # a concurrent heartbeat inserted the peer first: it is alive now, update it
        raise Conflict(f"peer {peer_id} changed under three heartbeats in a row")

    async def get_peer(self, peer_id: str) -> Peer:
        async with self._db() as db:
            return as_peer(await db.peers.find_one({"_id": peer_id}), peer_id)

    async def list_peers(self, run_id: str | None, status: PeerStatus | None, limit: int, offset: int) -> tuple[list[Peer], int]:
        query = {key: value for key, value in (("run_id", run_id), ("status", status)) if value is not None}
        async with self._db() as db:
            docs, total = await find_page(db.peers, query, PEER_ORDER, limit, offset)
        return [as_peer(doc, "") for doc in docs], total

    async def leave(self, peer_id: str, at: datetime) -> Peer:
        async with self._db() as db:
            doc = await db.peers.find_one_and_update(
                {"_id": peer_id}, {"$set": {"status": "left", "left_at": stored_time(at)}}, return_document=AFTER
            )
        return as_peer(doc, peer_id)

    async def mark_lost(self, seen_before: datetime, at: datetime) -> list[Peer]:
        stale = {"status": "alive", "last_seen": {"$lt": stored_time(seen_before)}}
        lost: list[Peer] = []
        async with self._db() as db:
            candidates = await db.peers.find(stale, {"_id": 1}).sort(PEER_ORDER).to_list()
            for candidate in candidates:
                # Re-checked one by one: a peer that heartbeats meanwhile stays alive and is not reported.
                doc = await db.peers.find_one_and_update(
                    {"_id": candidate["_id"], **stale},
                    {"$set": {"status": "lost", "left_at": stored_time(at)}},
                    return_document=AFTER,
                )
                if doc is not None:
                    lost.append(as_peer(doc, candidate["_id"]))
        return lost

    async def count_peers(self) -> dict[tuple[str, str], int]:
        pipeline = [{"$group": {"_id": {"run_id": "$run_id", "status": "$status"}, "n": {"$sum": 1}}}]
        async with self._db() as db:
            groups = await (await db.peers.aggregate(pipeline)).to_list()
        return {(group["_id"]["run_id"], group["_id"]["status"]): group["n"] for group in groups}

    # events
    async def add_event(self, event: Event) -> None:
        async with self._db() as db:
            await db.events.insert_one(stored(event).model_dump())

    async def list_events(self, run_id: str | None, limit: int, offset: int) -> tuple[list[Event], int]:
        query = {"run_id": run_id} if run_id is not None else {}
        async with self._db() as db:
            docs, total = await find_page(db.events, query, EVENT_ORDER, limit, offset)
        return [Event.model_validate({k: v for k, v in doc.items() if k != "_id"}) for doc in docs], total


async def find_page(collection: Any, query: Doc, order: list[tuple[str, int]], limit: int, offset: int) -> tuple[list[Doc], int]:
    limit, offset = page(limit, offset)
    docs = await collection.find(query).sort(order).skip(offset).limit(limit).to_list() if limit else []
    return docs, await collection.count_documents(query)


def as_run(doc: Doc | None, run_id: str) -> Run:
    if doc is None:
        raise NotFound(f"run {run_id} not found")
    doc.pop("_id", None)
    return Run.model_validate(doc)


def as_peer(doc: Doc | None, peer_id: str) -> Peer:
    if doc is None:
        raise NotFound(f"peer {peer_id} not found")
    doc.pop("_id", None)
    return Peer.model_validate(doc)
