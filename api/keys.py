"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from aiohttp import web

from api.store.base import Store
from mesh.config import ApiConfig

STORE = web.AppKey("store", Store)
# set when the coordinator is joined to a DHT: publishes a run created through the API (returns success)
PUBLISH: web.AppKey[Callable[[Any], Awaitable[bool]]] = web.AppKey("publish")
CONFIG = web.AppKey("config", ApiConfig)
# the heartbeat path's short-lived cache of runs: run_id -> (expires at, monotonic seconds; Run)
RUN_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("run_cache")
# the bootstrap's addresses read from its health URL: url -> (expires at, monotonic seconds; addrs)
BOOTSTRAP_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("bootstrap_cache")
# serialises the rare "a run reached a new epoch" update, so progress never moves backwards
ADVANCE_LOCK = web.AppKey("advance_lock", asyncio.Lock)
