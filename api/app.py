"""The coordinator's app factory: one cleanup context per resource (store, lost-peer monitor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from api import routes
from api.auth import make_auth_middleware
from api.errors import error_middleware
from api.handlers import mark_lost_peers
from api.instrumentation import TimedStore, metrics_middleware, refresh_gauges
from api.keys import ADVANCE_LOCK, BOOTSTRAP_CACHE, CONFIG, PUBLISH, RUN_CACHE, STORE
from api.store.base import Store, StoreError, Unavailable
from mesh.config import ApiConfig

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def make_store(config: ApiConfig) -> Store:
    if config.mongo_url:
        from api.store.mongo import MongoStore

        return MongoStore(config.mongo_url, database=config.mongo_database)
    from api.store.embedded import EmbeddedStore

    return EmbeddedStore(config.db_path)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the store; when the database is down at start, serve anyway (readiness says 503) and keep trying."""
    store = app[STORE]
    retry: asyncio.Task | None = None
    try:
        await store.open()
    except Unavailable as err:
        logger.warning("store unavailable at start error=%s; serving, ready once it answers", err)

        async def reopen() -> None:
            while True:
                await asyncio.sleep(5.0)
                try:
                    await store.open()
                    logger.info("store reachable; indexes ensured")
                    return
                except Unavailable:
                    continue

        retry = asyncio.create_task(reopen(), name="store-reopen")
    yield
    if retry is not None:
        retry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retry
    await store.close()


async def _lost_monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    interval = app[CONFIG].heartbeat_interval

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval / 2)  # so a silent peer is lost at most 3.5 intervals after its last beat
            try:
                await mark_lost_peers(app[STORE], interval)
            except StoreError as err:  # the store is down: try again next interval
                logger.warning("lost-peer check failed error=%s", err)
            except Exception:  # never let the monitor die silently
                logger.exception("lost-peer check failed")
            try:
                await refresh_gauges(app[STORE])
            except Exception:
                logger.exception("metrics refresh failed")

    task = asyncio.create_task(loop(), name="lost-peer-monitor")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def _observer_ctx(dht):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from api import observer

        config = app[CONFIG]

        async def publish(run) -> bool:
            return await asyncio.to_thread(observer.publish, dht, run, config.run_secret_key)

        app[PUBLISH] = publish
        task = asyncio.create_task(
            observer.observe_forever(dht, app[STORE], config.observe_interval, config.heartbeat_interval, config.run_secret_key),
            name="dht-observer",
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


def create_app(config: ApiConfig, store: Store | None = None, dht=None) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, make_auth_middleware(config.api_token, config.protect_reads)],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app[STORE] = TimedStore(store or make_store(config))  # type: ignore[misc]  # a Store that times every call
    app[RUN_CACHE] = {}
    app[BOOTSTRAP_CACHE] = {}
    app[ADVANCE_LOCK] = asyncio.Lock()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_lost_monitor_ctx)
    if dht is not None:
        app.cleanup_ctx.append(_observer_ctx(dht))
    routes.setup(app)
    if STATIC.is_dir():
        app.router.add_get("/", _index, name="index")
        app.router.add_static("/static/", STATIC, name="static")
    return app
