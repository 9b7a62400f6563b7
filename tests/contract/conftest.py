"""Fixtures for the store contract: the same tests run against each store (embedded SQLite file, MongoDB).

MongoDB is the server named by ``MESH_TEST_MONGO_URL`` when set; otherwise one SecantusDB server (a MongoDB
wire-protocol server in Python, a test dependency only) started in this process for the whole session. Each test gets
its own database, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymongo import MongoClient
from secantus import SecantusDBServer

from api.store.base import Store
from api.store.embedded import EmbeddedStore
from api.store.mongo import MongoStore

MONGO_URL_ENV = "MESH_TEST_MONGO_URL"


class TestServer(SecantusDBServer):
    def stop(self) -> None:
        # Closing a listening socket does not wake a thread blocked in accept() on Linux; SecantusDBServer.stop then
        # waits 2 s for its accept thread. shutdown() wakes it at once (elsewhere it may fail: then we just wait).
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        super().stop()


def start_secantus(storage: Path, port: int = 0) -> SecantusDBServer:
    """A SecantusDB server on 127.0.0.1 (port 0 = a free one), standalone (no replica-set oplog to keep)."""
    server = TestServer(host="127.0.0.1", port=port, storage_path=str(storage), replica_set_name=None)
    server.start()
    return server


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get(MONGO_URL_ENV)
    if url:
        yield url
        return
    server = start_secantus(tmp_path_factory.mktemp("secantus"))
    try:
        yield server.uri
    finally:
        server.stop()


@dataclass(frozen=True)
class Backend:
    name: str
    new: Callable[[], Store]
    """A new, unopened store on this test's file or database (a second instance sees what the first wrote)."""


@pytest.fixture(params=["embedded", "mongo"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        path = tmp_path / "coordinator.db"
        yield Backend("embedded", lambda: EmbeddedStore(path))
        return
    url = request.getfixturevalue("mongo_url")
    database = f"mesh_test_{uuid.uuid4().hex[:12]}"
    yield Backend("mongo", lambda: MongoStore(url, database))
    with MongoClient(url, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(database)


@pytest.fixture
async def open_store(backend: Backend) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Factory: ``await open_store()`` opens a new store instance on the test's backend; all are closed at teardown."""
    opened: list[Store] = []

    async def make() -> Store:
        store = backend.new()
        opened.append(store)
        await store.open()
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: Callable[[], Awaitable[Store]]) -> Store:
    return await open_store()


class PrivateSecantus:
    """A SecantusDB server of one test's own, to stop and start again on the same port and storage."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.server: SecantusDBServer | None = start_secantus(storage)
        self.port = self.server.port
        self.uri = self.server.uri

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    def start(self) -> None:
        if self.server is None:
            self.server = start_secantus(self.storage, self.port)
