"""Keep fire-and-forget asyncio tasks alive until they finish.

asyncio holds only weak references to tasks. hivemind creates many tasks without keeping them (its DHT process
runs every request as ``asyncio.create_task(...)``); a task whose awaited future is referenced from nowhere else
can then be garbage-collected mid-flight. The request's caller waits forever: we saw a peer hang at start-up in
``DHT.replicate_p2p`` with ``GeneratorExit`` logged by the DHT process, and hivemind logs "Task was destroyed but
it is pending!" at random. Holding a strong reference to every task until it is done removes the hazard.

Installed once per process at import of ``mesh.dht``; forked children (hivemind's DHT and averagers) inherit it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, TypeVar

_live: set[asyncio.Future] = set()
_installed = False


F = TypeVar("F", bound=asyncio.Future)


def _keep(task: F) -> F:
    _live.add(task)
    task.add_done_callback(_live.discard)
    return task


def install() -> None:
    global _installed
    if _installed:
        return
    original_create_task = asyncio.create_task
    original_ensure_future = asyncio.ensure_future

    @functools.wraps(original_create_task)
    def create_task(coro: Any, **kwargs: Any) -> asyncio.Task:
        return _keep(original_create_task(coro, **kwargs))

    @functools.wraps(original_ensure_future)
    def ensure_future(obj: Any, **kwargs: Any) -> asyncio.Future:
        return _keep(original_ensure_future(obj, **kwargs))

    asyncio.create_task = create_task  # the same signature, wrapped
    asyncio.ensure_future = ensure_future  # type: ignore[assignment]
    _installed = True
