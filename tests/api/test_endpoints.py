"""Every endpoint through aiohttp's test client, on the real embedded store: success and each error code."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from mesh.config import ApiConfig
from tests.procs import free_port

PEER = "12D3KooWSB3L5TWVTFUmLUg2LRtbYVZtYCjmsACqFCiXUvLF9sJ8"
PEER2 = "12D3KooWKtf7Ywz3eqtHB67LZNee5urcZCorNtUUT6KHq7eewJXY"
BOOT = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER2}"


async def make_client(tmp_path: Path, **overrides) -> TestClient:
    config = ApiConfig(**{"db_path": tmp_path / "coordinator.db", "bootstrap": (BOOT,), **overrides})
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    client = await make_client(tmp_path)
    yield client
    await client.close()


async def test_bootstrap_health_url_is_handed_out_as_the_addresses_it_lists(tmp_path: Path) -> None:
    """A peer elsewhere asks the coordinator how to join: it gets the bootstrap's announced multiaddrs, not the
    service-name URL (http://bootstrap:9100/healthz) that only resolves beside the coordinator."""
    listed = {"addrs": [f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER2}"]}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **listed})

    health = web.Application()
    health.router.add_get("/healthz", healthz)
    server = TestServer(health)
    await server.start_server()
    dead = f"http://127.0.0.1:{free_port()}/healthz"
    client = await make_client(tmp_path, bootstrap=(str(server.make_url("/healthz")), dead, BOOT))
    try:
        expected = [*listed["addrs"], dead, BOOT]  # a URL that never answered is passed on for the peer to retry
        assert (await (await client.get("/api/v1/bootstrap")).json()) == {"addrs": expected}
        assert (await (await client.get("/api/v1/summary")).json())["bootstrap"] == expected
        await server.close()  # the bootstrap goes away: the addresses it listed are still handed out
        assert (await (await client.get("/api/v1/bootstrap")).json()) == {"addrs": expected}
    finally:
        await client.close()
        await server.close()


def assert_error(body: dict, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert "Traceback" not in json.dumps(body)


async def create(client: TestClient, run_id: str = "r1", **extra) -> dict:
    response = await client.post("/api/v1/runs", json={"run_id": run_id, "task": "regression", **extra})
    assert response.status == 201, await response.text()
    return await response.json()


def beat(run_id: str = "r1", epoch: int = 0, loss: float | None = None) -> dict:
    return {
        "run_id": run_id,
        "addrs": [BOOT],
        "host": "box",
        "device": "cpu",
        "version": "0.1.0",
        "epoch": epoch,
        "samples_per_second": 10.0,
        "loss": loss,
    }


async def test_health_ready_summary_bootstrap(client: TestClient) -> None:
    assert (await (await client.get("/api/v1/health")).json())["status"] == "ok"
    assert (await (await client.get("/api/v1/ready")).json())["status"] == "ready"
    await create(client)
    summary = await (await client.get("/api/v1/summary")).json()
    assert summary["runs"]["created"] == 1 and summary["bootstrap"] == [BOOT]
    assert (await (await client.get("/api/v1/bootstrap")).json()) == {"addrs": [BOOT]}


async def test_ready_and_writes_answer_503_when_the_store_is_down(tmp_path: Path) -> None:
    from api.store.mongo import MongoStore

    config = ApiConfig(mongo_url=f"mongodb://127.0.0.1:{free_port()}")
    client = TestClient(TestServer(create_app(config, MongoStore(config.mongo_url, timeout_ms=300))))
    await client.start_server()
    try:
        response = await client.get("/api/v1/ready")
        assert response.status == 503
        assert_error(await response.json(), "store_unavailable")
        response = await client.post("/api/v1/runs", json={"run_id": "r1", "task": "regression"})
        assert response.status == 503
        assert_error(await response.json(), "store_unavailable")
        assert (await client.get("/api/v1/health")).status == 200  # the process is up
    finally:
        await client.close()


async def test_runs_create_get_list_stop(client: TestClient) -> None:
    run = await create(client, hyperparameters={"lr": 0.1, "optimizer": "sgd"}, min_peers=2, max_peers=4)
    assert run["status"] == "created" and run["hyperparameters"]["lr"] == 0.1 and run["min_peers"] == 2
    assert (await (await client.get("/api/v1/runs/r1")).json()) == run
    await create(client, "r2")
    page = await (await client.get("/api/v1/runs?limit=1")).json()
    assert page["total"] == 2 and len(page["items"]) == 1 and page["items"][0]["run_id"] == "r2"  # newest first
    stopped = await (await client.post("/api/v1/runs/r1/stop")).json()
    assert stopped["status"] == "stopped" and stopped["stopped_at"]
    page = await (await client.get("/api/v1/runs?status=stopped")).json()
    assert [r["run_id"] for r in page["items"]] == ["r1"]
    events = await (await client.get("/api/v1/runs/r1/events")).json()
    assert [e["kind"] for e in events["items"]] == ["run_stopped", "run_created"]


async def test_run_errors(client: TestClient) -> None:
    await create(client)
    response = await client.post("/api/v1/runs", json={"run_id": "r1", "task": "regression"})
    assert response.status == 409
    assert_error(await response.json(), "conflict")
    for body in (
        {"run_id": "bad id", "task": "regression"},
        {"run_id": "r9", "task": "regression", "surprise": 1},
        {"run_id": "r9", "task": "regression", "hyperparameters": {"lr": -1}},
        {"run_id": "r9", "task": "regression", "min_peers": 5, "max_peers": 2},
        {"task": "regression"},
    ):
        response = await client.post("/api/v1/runs", json=body)
        assert response.status == 422, body
        assert (await response.json())["error"]["code"] in ("invalid_body", "invalid_parameter")
    response = await client.post("/api/v1/runs", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 422
    response = await client.post("/api/v1/runs", data=io.BytesIO(b"x" * 2_000_000))  # a stream: aiohttp warns on big raw bytes
    assert response.status == 413
    assert_error(await response.json(), "body_too_large")
    for path in ("/api/v1/runs/nope", "/api/v1/runs/nope/history", "/api/v1/runs/nope/events"):
        response = await client.get(path)
        assert response.status == 404, path
        assert_error(await response.json(), "not_found")
    assert (await client.post("/api/v1/runs/nope/stop")).status == 404
    for query in ("status=bogus", "limit=0", "limit=100000", "limit=abc", "offset=-1"):
        response = await client.get(f"/api/v1/runs?{query}")
        assert response.status == 422, query
        assert_error(await response.json(), "invalid_parameter")
    assert (await client.get("/api/v1/runs/bad%20id")).status == 422


async def test_stopping_an_ended_run_again_is_idempotent_but_cannot_restart(client: TestClient) -> None:
    await create(client)
    assert (await client.post("/api/v1/runs/r1/stop")).status == 200
    assert (await client.post("/api/v1/runs/r1/stop")).status == 200


async def test_heartbeat_upserts_and_advances_history(client: TestClient) -> None:
    await create(client)
    first = await (await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat())).json()
    assert first["newly_joined"] and first["run_status"] == "created" and first["peer"]["status"] == "alive"
    again = await (await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat(epoch=1, loss=0.5))).json()
    assert not again["newly_joined"] and again["run_status"] == "running"
    await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat(epoch=1, loss=0.5))  # same epoch: no new point
    await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat(epoch=2, loss=0.25))
    history = await (await client.get("/api/v1/runs/r1/history")).json()
    assert [(p["epoch"], p["loss"]) for p in history["items"]] == [(1, 0.5), (2, 0.25)]
    run = await (await client.get("/api/v1/runs/r1")).json()
    assert run["progress"]["epoch"] == 2 and run["progress"]["peers_alive"] == 1
    peers = await (await client.get("/api/v1/peers?run_id=r1&status=alive")).json()
    assert peers["total"] == 1 and peers["items"][0]["peer_id"] == PEER and peers["items"][0]["epoch"] == 2
    assert (await (await client.get(f"/api/v1/peers/{PEER}")).json())["host"] == "box"


async def test_heartbeat_for_a_run_created_in_the_dht_records_it_with_the_reported_settings(client: TestClient) -> None:
    hyper = {"lr": 0.05, "target_batch_size": 4096, "aggregation": "clipped", "optimizer": "adamw", "seed": 7}
    body = {**beat("dht-run"), "task": "demo", "hyperparameters": hyper}
    assert (await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=body)).status == 200
    run = await (await client.get("/api/v1/runs/dht-run")).json()
    assert run["task"] == "demo" and run["status"] == "running"
    assert {name: run["hyperparameters"][name] for name in hyper} == hyper
    # settings outside the API's bounds (an lr above 10) never cost the heartbeat: the run gets the defaults
    odd = {**beat("odd-run"), "task": "demo", "hyperparameters": {"lr": 50.0}}
    assert (await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=odd)).status == 200
    run = await (await client.get("/api/v1/runs/odd-run")).json()
    assert run["hyperparameters"]["lr"] is None and run["hyperparameters"]["aggregation"] == "mean"


async def test_stop_reaches_peers_through_their_heartbeat_and_leave(client: TestClient) -> None:
    await create(client)
    await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat())
    await client.post("/api/v1/runs/r1/stop")
    answer = await (await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat())).json()
    assert answer["run_status"] == "stopped"
    left = await (await client.post(f"/api/v1/peers/{PEER}/leave")).json()
    assert left["status"] == "left" and left["left_at"]


async def test_peer_errors(client: TestClient) -> None:
    response = await client.get(f"/api/v1/peers/{PEER}")
    assert response.status == 404
    assert_error(await response.json(), "not_found")
    assert (await client.post(f"/api/v1/peers/{PEER}/leave")).status == 404
    assert (await client.get("/api/v1/peers/not-a-peer-id!")).status == 422
    response = await client.put(f"/api/v1/peers/{PEER}/heartbeat", json={"run_id": "r1", "epoch": -1})
    assert response.status == 422
    assert_error(await response.json(), "invalid_body")
    assert (await client.get("/api/v1/peers?status=sleeping")).status == 422
    assert (await client.get("/api/v1/peers?run_id=bad%20id")).status == 422


async def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    response = await client.get("/api/v1/nothing-here")
    assert response.status == 404
    assert_error(await response.json(), "not_found")
    response = await client.delete("/api/v1/runs")
    assert response.status == 405
    assert_error(await response.json(), "method_not_allowed")


async def test_silent_peer_becomes_lost_within_three_intervals(tmp_path: Path) -> None:
    client = await make_client(tmp_path, heartbeat_interval=0.2)
    try:
        await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat())
        deadline = asyncio.get_running_loop().time() + 5
        while (peer := await (await client.get(f"/api/v1/peers/{PEER}")).json())["status"] != "lost":
            assert asyncio.get_running_loop().time() < deadline, peer
            await asyncio.sleep(0.1)
        from datetime import datetime

        silent = datetime.fromisoformat(peer["left_at"]) - datetime.fromisoformat(peer["last_seen"])
        assert silent.total_seconds() >= 3 * 0.2  # not before 3 missed intervals
        events = await (await client.get("/api/v1/runs/r1/events")).json()
        assert "peer_lost" in [e["kind"] for e in events["items"]]
    finally:
        await client.close()


async def test_bearer_token_guards_writes(tmp_path: Path) -> None:
    client = await make_client(tmp_path, api_token="s3cret")
    try:
        response = await client.post("/api/v1/runs", json={"run_id": "r1", "task": "regression"})
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert_error(await response.json(), "unauthorized")
        bad = {"Authorization": "Bearer wrong"}
        assert (await client.post("/api/v1/runs", json={"run_id": "r1", "task": "x"}, headers=bad)).status == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/api/v1/runs", json={"run_id": "r1", "task": "x"}, headers=good)).status == 201
        assert (await client.get("/api/v1/runs")).status == 200  # reads stay open
    finally:
        await client.close()


async def test_a_runs_secret_is_handed_only_to_token_holders(tmp_path: Path) -> None:
    from mesh.admission import coordinator_secret

    key = "the-coordinators-secret-key"
    client = await make_client(tmp_path, api_token="s3cret", run_secret_key=key)
    good = {"Authorization": "Bearer s3cret"}
    try:
        assert (await client.post("/api/v1/runs", json={"run_id": "r1", "task": "regression"}, headers=good)).status == 201
        # reads are open on this coordinator, but not this one
        response = await client.get("/api/v1/runs/r1/secret")
        assert response.status == 401
        assert_error(await response.json(), "unauthorized")
        assert (await client.get("/api/v1/runs/r1/secret", headers={"Authorization": "Bearer wrong"})).status == 401
        body = await (await client.get("/api/v1/runs/r1/secret", headers=good)).json()
        assert body == {"run_id": "r1", "run_secret": coordinator_secret(key, "r1")}
        assert coordinator_secret(key, "r1") != coordinator_secret(key, "r2") and len(body["run_secret"]) >= 16
        assert (await client.get("/api/v1/runs/nope/secret", headers=good)).status == 404
        assert "run_secret" not in json.dumps(await (await client.get("/api/v1/runs/r1")).json())  # never elsewhere
    finally:
        await client.close()
    plain = await make_client(tmp_path / "plain", api_token="s3cret")
    try:
        await plain.post("/api/v1/runs", json={"run_id": "r1", "task": "regression"}, headers=good)
        response = await plain.get("/api/v1/runs/r1/secret", headers=good)
        assert response.status == 404 and "--run-secret-key" in (await response.json())["error"]["message"]
    finally:
        await plain.close()


def test_a_secret_key_without_a_token_is_refused() -> None:
    from mesh.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --api-token"):
        ApiConfig(run_secret_key="the-coordinators-secret-key")


async def test_everything_persists_across_a_restart(tmp_path: Path) -> None:
    client = await make_client(tmp_path)
    await create(client)
    await client.put(f"/api/v1/peers/{PEER}/heartbeat", json=beat(epoch=1, loss=0.5))
    await client.close()
    client = await make_client(tmp_path)
    try:
        assert (await (await client.get("/api/v1/runs/r1")).json())["progress"]["epoch"] == 1
        assert (await (await client.get(f"/api/v1/peers/{PEER}")).json())["epoch"] == 1
        assert len((await (await client.get("/api/v1/runs/r1/history")).json())["items"]) == 1
    finally:
        await client.close()


async def test_openapi_document_is_valid_and_covers_every_route(client: TestClient) -> None:
    from openapi_spec_validator import validate

    document = await (await client.get("/api/v1/openapi.json")).json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    routes = {(r.method, r.resource.canonical) for r in client.app.router.routes() if r.resource is not None}
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    api_routes = {(m, p) for m, p in routes if p.startswith("/api/v1") and p != "/api/v1/openapi.json" and m != "HEAD"}
    assert api_routes == documented


async def test_metrics_page_negotiates_openmetrics_and_filters(client: TestClient) -> None:
    await client.get("/api/v1/health")
    plain = await client.get("/metrics")
    assert plain.status == 200 and plain.headers["Content-Type"].startswith("text/plain")
    assert "mesh_api_requests_total" in await plain.text()
    openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await openmetrics.text()).rstrip().endswith("# EOF")
    only = await (await client.get("/metrics", params={"name[]": "mesh_build_info"})).text()
    assert "mesh_build_info" in only and "mesh_api_requests_total" not in only


async def test_unset_hyperparameters_are_the_tasks_defaults_as_for_mesh_peer(client: TestClient) -> None:
    """Reference: the record ``mesh peer --task regression`` creates (mesh.runs.create_record with no flags)."""
    from mesh.config import RunDefaults
    from mesh.runs import create_record
    from mesh.tasks import load_task

    expected = create_record("r1", "regression", load_task("regression"), RunDefaults())
    hyper = (await create(client))["hyperparameters"]
    assert {k: hyper[k] for k in ("optimizer", "lr", "batch_size", "target_batch_size")} == {
        "optimizer": expected.optimizer,
        "lr": expected.lr,
        "batch_size": expected.batch_size,
        "target_batch_size": expected.target_batch_size,
    }
    assert hyper["optimizer"] == "sgd" and hyper["target_batch_size"] == 64  # not the API's old adamw / 1024
    given = (await create(client, "r2", hyperparameters={"lr": 0.05}))["hyperparameters"]
    assert given["lr"] == 0.05 and given["optimizer"] == "sgd"  # what is given wins, the rest is the task's
    stored = await (await client.get("/api/v1/runs/r2")).json()
    assert stored["hyperparameters"] == given
    # a user's module:function task is never imported by the coordinator (a request must not run code): unset stays
    # unset, for the first peer to resolve; "sys:exit" would have stopped the coordinator
    for run_id, task in (("r3", "no_such_module_xyz:task"), ("r4", "sys:exit"), ("r5", "mesh.tasks.regression:regression_task")):
        response = await client.post("/api/v1/runs", json={"run_id": run_id, "task": task})
        assert response.status == 201
        assert (await response.json())["hyperparameters"]["optimizer"] is None
    assert (await client.get("/api/v1/health")).status == 200
