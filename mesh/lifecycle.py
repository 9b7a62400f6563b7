"""Process lifecycle: signal handlers that only set a flag, bounded shutdown, and reaping child processes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

import psutil

logger = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event | None = None) -> threading.Event:
    """SIGTERM/SIGINT set ``stop``; a second signal while stopping exits at once (code 130)."""
    stop = stop or threading.Event()
    owner = os.getpid()

    def handle(signum: int, _frame) -> None:
        if os.getpid() != owner:
            # a forked helper (hivemind's DHT and averagers fork) inherited this handler. Ctrl-C in a terminal, and
            # systemd's stop, signal the whole process group: a helper that died of it left the training process
            # waiting forever on its round. The helper stays, and its owner shuts it down in its bounded leave
            # (reaping whatever is left, kill_descendants).
            signal.signal(signum, signal.SIG_IGN)
            return
        if stop.is_set():
            logger.warning("second signal=%s, exiting now", signal.Signals(signum).name)
            kill_descendants()
            os._exit(130)
        logger.info("received signal=%s, leaving gracefully", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


# torch's shared-memory manager exits by itself once its clients are gone; killing it under a live client makes
# the client abort at exit ("terminate called after throwing ... Broken pipe").
_SPARE = ("torch_shm_manager",)


def _spared(process: psutil.Process) -> bool:
    try:
        return process.name() in _SPARE or any(name in " ".join(process.cmdline()) for name in _SPARE)
    except psutil.Error:
        return True


def kill_descendants(pid: int | None = None, timeout: float = 3.0) -> int:
    """Terminate, then kill, every process below ``pid`` (hivemind's helpers and libp2p daemons)."""
    try:
        children = [c for c in psutil.Process(pid or os.getpid()).children(recursive=True) if not _spared(c)]
    except psutil.NoSuchProcess:
        return 0
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)


def run_steps_with_deadline(steps: list[tuple[str, Callable[[], object]]], timeout: float) -> bool:
    """Run shutdown steps in order, logging each; give up when ``timeout`` runs out. True when all finished."""
    deadline = time.monotonic() + timeout
    done = threading.Event()

    def worker() -> None:
        for name, step in steps:
            started = time.monotonic()
            try:
                step()
            except Exception:
                logger.exception("shutdown step failed step=%s", name)
            logger.debug("shutdown step done step=%s seconds=%.2f", name, time.monotonic() - started)
        done.set()

    threading.Thread(target=worker, name="shutdown", daemon=True).start()
    finished = done.wait(max(0.0, deadline - time.monotonic()))
    if not finished:
        logger.warning("shutdown did not finish within %.0fs; killing helper processes", timeout)
    return finished
