"""The coordinator on a MongoDB wire-protocol server: restart keeps everything; an outage answers 503 and the
coordinator recovers by itself when the database returns."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from api.store.mongo import MongoStore
from mesh.config import ApiConfig
from tests.api.test_endpoints import PEER, assert_error, beat, create
from tests.contract.conftest import PrivateSecantus


async def start(url: str) -> TestClient:
    config = ApiConfig(mongo_url=url)
    client = TestClient(TestServer(create_app(config, MongoStore(url, "mesh", timeout_ms=1000))))
    await client.start_server()
    return client


async def test_restart_keeps_runs_peers_history_and_events(private_secantus: PrivateSecantus) -> None:
    client = await start(private_secantus.uri)
    await create(client)
    await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat(epoch=1, loss=0.5))
    await client.close()
    client = await start(private_secantus.uri)
    try:
        assert (await (await client.get("/api/v1/runs/r1")).json())["progress"]["epoch"] == 1
        assert (await (await client.get(f"/api/v1/peers/{PEER}")).json())["status"] == "alive"
        assert len((await (await client.get("/api/v1/runs/r1/history")).json())["items"]) == 1
        kinds = [e["kind"] for e in (await (await client.get("/api/v1/runs/r1/events")).json())["items"]]
        assert kinds == ["peer_joined", "run_created"]
    finally:
        await client.close()


async def test_outage_answers_503_and_recovers_without_a_restart(private_secantus: PrivateSecantus) -> None:
    client = await start(private_secantus.uri)
    try:
        assert (await client.get("/api/v1/ready")).status == 200
        await create(client)
        private_secantus.stop()
        response = await client.get("/api/v1/ready")
        assert response.status == 503
        assert_error(await response.json(), "store_unavailable")
        response = await client.post("/api/v1/runs", json={"run_id": "r2", "task": "regression"})
        assert response.status == 503
        body = await response.json()
        assert "database is unavailable" in body["error"]["message"] and "retry" in body["error"]["message"]
        private_secantus.start()
        deadline = time.monotonic() + 20
        while (await client.get("/api/v1/ready")).status != 200:
            assert time.monotonic() < deadline, "the coordinator did not recover"
            await asyncio.sleep(0.5)
        await create(client, "r2")  # writes work again, and nothing was lost
        assert (await client.get("/api/v1/runs/r1")).status == 200
    finally:
        await client.close()
