"""Heartbeats to the coordinator, from a background thread with its own event loop.

The coordinator is never in the training path: a coordinator that is down, slow or restarting costs the training
loop nothing (the loop only swaps a snapshot in), heartbeats back off, and the peer re-registers when it returns.
A run stopped through the coordinator's API is seen in the next heartbeat's answer and makes the peer leave.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import threading
from typing import Any, Callable

import aiohttp

from mesh import __version__
from mesh.coordinator_client import Coordinator

logger = logging.getLogger(__name__)

ENDED = ("stopped", "finished", "failed")


class Reporter(threading.Thread):
    def __init__(
        self,
        coordinator: Coordinator,
        peer_id: str,
        snapshot: Callable[[], dict[str, Any]],
        on_run_ended: Callable[[str], None],
        interval: float = 5.0,
    ) -> None:
        super().__init__(name="coordinator-reporter", daemon=True)
        self.coordinator = coordinator
        self.peer_id, self.snapshot, self.on_run_ended = peer_id, snapshot, on_run_ended
        self.interval, self.max_backoff = interval, interval * 8
        self.failures = 0
        self.sent = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()
            self._done.set()

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=min(10.0, self.interval * 2))
        self._wake = asyncio.Event()
        async with aiohttp.ClientSession(timeout=timeout, headers=self.coordinator.headers) as session:
            delay = 0.0
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                if self._stopping.is_set():
                    break
                delay = await self._beat(session)
            await self._leave(session)

    async def _beat(self, session: aiohttp.ClientSession) -> float:
        try:
            body = {**self.snapshot(), "version": __version__, "host": platform.node()}
            async with session.put(self.coordinator.api(f"/peers/{self.peer_id}/heartbeat"), json=body) as response:
                if response.status >= 400:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
                answer = await response.json()
        except Exception as err:  # whatever goes wrong, training goes on and we retry
            self.failures += 1
            backoff = min(self.max_backoff, self.interval * 2 ** min(self.failures, 6))
            if self.failures == 1 or self.failures % 10 == 0:
                logger.warning(
                    "coordinator unreachable url=%s error=%s; training goes on, retry in %.0fs", self.coordinator.base, err, backoff
                )
            return backoff
        if self.failures:
            logger.info("coordinator reachable again url=%s after_failures=%d", self.coordinator.base, self.failures)
        self.failures = 0
        self.sent += 1
        if answer.get("run_status") in ENDED:
            logger.info("run %s through the coordinator; leaving", answer["run_status"])
            self.on_run_ended(answer["run_status"])
        return self.interval

    async def _leave(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(self.coordinator.api(f"/peers/{self.peer_id}/leave")) as response:
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            logger.warning("could not tell the coordinator we left error=%s", err)

    def stop(self, timeout: float = 5.0) -> None:
        """Send a last 'leave' and stop; bounded by ``timeout``."""
        self._stopping.set()
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop already closed
                pass
        self._done.wait(timeout)
