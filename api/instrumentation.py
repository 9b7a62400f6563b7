"""The coordinator's metrics: requests by route template, store operation latency, and gauges of what it knows."""

from __future__ import annotations

import functools
import time
from typing import Any

from aiohttp import web

from api.handlers import run_counts
from api.store.base import Store, StoreError
from mesh import metrics


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        metrics.api_requests.labels(request.method, route, str(status)).inc()
        metrics.api_request_duration.labels(request.method, route).observe(time.perf_counter() - started)


class TimedStore:
    """Wraps a store: every coroutine method's latency goes to ``mesh_api_store_operation_duration_seconds``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        @functools.wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                metrics.api_store_duration.labels(name).observe(time.perf_counter() - started)

        self.__dict__[name] = timed  # built once per method: every heartbeat goes through here
        return timed


async def refresh_gauges(store: Store) -> None:
    """Runs by status, peers by run and status, readiness: refreshed by the coordinator's monitor loop."""
    try:
        await store.ping()
        counts = await store.count_peers()
        runs = await run_counts(store)
    except StoreError:
        metrics.api_ready.set(0)
        return
    metrics.api_ready.set(1)
    metrics.api_peers.clear()
    for (run, status), count in counts.items():
        metrics.api_peers.labels(run, status).set(count)
        metrics.api_peers_lost.labels(run)  # exists at 0 before the first loss, so increase() sees the step
    for status, count in runs.items():
        metrics.api_runs.labels(status).set(count)
