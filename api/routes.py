"""The REST API's one table of operations: it registers the routes and generates the OpenAPI 3.1 document, so
the document and the code cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import handlers as h
from api.models import (
    PEER_ID,
    RUN_ID,
    Bootstrap,
    ErrorResponse,
    EventPage,
    Health,
    Heartbeat,
    HeartbeatResponse,
    HistoryList,
    Peer,
    PeerPage,
    Run,
    RunCreate,
    RunPage,
    RunSecret,
    Summary,
)
from api.store.base import MAX_LIMIT
from mesh import __version__

PREFIX = "/api/v1"


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str = ""


LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}, "page size")
OFFSET = Param("offset", {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0}, "items to skip")


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    tag: str
    response: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    query: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    secured: bool = False  # needs the bearer token even as a read (api/auth.py: ALWAYS_PROTECTED)


_RUN = "{run_id}"
_PEER = "{peer_id}"
OPERATIONS = (
    Operation("GET", "/health", h.health, "The process is up", "health", Health),
    Operation("GET", "/ready", h.ready, "The store answers (503 when it does not)", "health", Health, errors=(503,)),
    Operation("GET", "/summary", h.summary, "Runs by status, peers by status, bootstrap addresses", "mesh", Summary, errors=(503,)),
    Operation("GET", "/bootstrap", h.bootstrap, "Multiaddrs a new peer can join through", "mesh", Bootstrap),
    Operation(
        "GET",
        "/runs",
        h.list_runs,
        "List runs, newest first",
        "runs",
        RunPage,
        errors=(422, 503),
        query=(Param("status", {"type": "string", "enum": list(h.RUN_STATUSES)}, "only runs in this status"), LIMIT, OFFSET),
    ),
    Operation("POST", "/runs", h.create_run, "Create a run", "runs", Run, 201, RunCreate, errors=(401, 409, 413, 422, 503)),
    Operation("GET", f"/runs/{_RUN}", h.get_run, "One run", "runs", Run, errors=(404, 422, 503)),
    Operation(
        "GET",
        f"/runs/{_RUN}/secret",
        h.run_secret,
        "The run's secret, for peers holding the API token (with --run-secret-key)",
        "runs",
        RunSecret,
        errors=(401, 404, 422, 503),
        secured=True,
    ),
    Operation(
        "POST",
        f"/runs/{_RUN}/stop",
        h.stop_run,
        "Stop a run: its peers leave at their next heartbeat",
        "runs",
        Run,
        errors=(401, 404, 409, 422, 503),
    ),
    Operation(
        "GET",
        f"/runs/{_RUN}/history",
        h.run_history,
        "Per-epoch loss and throughput, spread over the whole run",
        "runs",
        HistoryList,
        errors=(404, 422, 503),
        query=(
            Param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 10000, "default": 500},
                "at most N points, evenly spread from the first epoch to the last (every point when fewer)",
            ),
        ),
    ),
    Operation(
        "GET",
        f"/runs/{_RUN}/events",
        h.run_events,
        "What happened in a run, newest first",
        "runs",
        EventPage,
        errors=(404, 422, 503),
        query=(LIMIT, OFFSET),
    ),
    Operation(
        "GET",
        "/peers",
        h.list_peers,
        "List peers",
        "peers",
        PeerPage,
        errors=(422, 503),
        query=(
            Param("run_id", {"type": "string", "pattern": RUN_ID}, "only peers of this run"),
            Param("status", {"type": "string", "enum": list(h.PEER_STATUSES)}, "only peers in this status"),
            LIMIT,
            OFFSET,
        ),
    ),
    Operation("GET", f"/peers/{_PEER}", h.get_peer, "One peer", "peers", Peer, errors=(404, 422, 503)),
    Operation(
        "PUT",
        f"/peers/{_PEER}/heartbeat",
        h.heartbeat,
        "Report a peer's progress (idempotent upsert)",
        "peers",
        HeartbeatResponse,
        body=Heartbeat,
        errors=(401, 413, 422, 503),
    ),
    Operation("POST", f"/peers/{_PEER}/leave", h.leave, "A peer leaves gracefully", "peers", Peer, errors=(401, 404, 422, 503)),
)


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def setup(app: web.Application) -> None:
    for op in OPERATIONS:
        app.router.add_route(op.method, PREFIX + op.path, op.handler, name=op.handler.__name__)
    app.router.add_get(PREFIX + "/openapi.json", openapi_handler, name="openapi")
    # prometheus_client's own handler: content negotiation (OpenMetrics), ?name[]= filters, gzip when asked
    app.router.add_get("/metrics", make_aiohttp_handler(), name="metrics")


_PATH_PARAMS = {
    "run_id": {"type": "string", "pattern": RUN_ID},
    "peer_id": {"type": "string", "pattern": PEER_ID},
}
_ERROR_TEXT = {
    401: "Missing or wrong bearer token",
    404: "Unknown id",
    409: "Conflicts with what is stored",
    413: "Body too large",
    422: "Invalid body or parameter",
    503: "The store is unavailable",
}


def openapi_document() -> dict[str, Any]:
    models = {op.response for op in OPERATIONS} | {op.body for op in OPERATIONS if op.body} | {ErrorResponse}
    _, schemas = models_json_schema(
        [(m, "validation" if any(op.body is m for op in OPERATIONS) else "serialization") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        path = PREFIX + op.path
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": schema}
            for name, schema in _PATH_PARAMS.items()
            if "{" + name + "}" in path
        ]
        parameters += [
            {"name": p.name, "in": "query", "required": False, "schema": p.schema, "description": p.description} for p in op.query
        ]
        responses: dict[str, Any] = {
            str(op.status): {
                "description": op.summary,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.response.__name__}"}}},
            }
        }
        for code in op.errors:
            responses[str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
        operation: dict[str, Any] = {
            "operationId": op.handler.__name__,
            "summary": op.summary,
            "tags": [op.tag],
            "responses": responses,
        }
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.body.__name__}"}}},
            }
        if op.secured:
            operation["security"] = [{"bearer": []}]
        elif op.method != "GET":
            operation["security"] = [{"bearer": []}, {}]
        paths.setdefault(path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mesh coordinator",
            "version": __version__,
            "description": "Runs and membership of a peer-to-peer training mesh.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
