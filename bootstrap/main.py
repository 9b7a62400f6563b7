"""The bootstrap node: the first DHT peer. Fixed port, persistent identity, prints the join command."""

from __future__ import annotations

import logging
import time

from mesh import atomicfile, httpserve, lifecycle, logs, metrics
from mesh.config import BootstrapConfig, describe
from mesh.dht import routing_table_size, start_dht, visible_maddrs

logger = logging.getLogger(__name__)

REFRESH_PERIOD = 15.0  # seconds between routing-table refreshes


def run(config: BootstrapConfig) -> int:
    stop = lifecycle.install_stop_handlers()
    started = time.monotonic()
    logger.info("bootstrap config %s", describe(config))
    metrics.init_build_info("bootstrap")
    dht = start_dht(config)
    logs.set_context(peer_id=str(dht.peer_id))
    try:
        addrs = visible_maddrs(dht)
        if config.metrics_port is not None:
            httpserve.serve(
                config.host,
                config.metrics_port,
                lambda: {
                    "status": "ok",
                    "peer_id": str(dht.peer_id),
                    "addrs": addrs,
                    "uptime_seconds": time.monotonic() - started,
                },
            )
        # the address file says "ready" (mesh up and scripts wait for it): written once the health URL answers too
        if config.address_file is not None:
            atomicfile.write(config.address_file, "\n".join(addrs) + "\n")
        print("bootstrap node is up; peers join with:", flush=True)
        for addr in addrs:
            print(f"  mesh peer --join {addr} --run RUN_ID --task TASK", flush=True)
        while not stop.wait(min(REFRESH_PERIOD, 1.0) if time.monotonic() - started < 5 else REFRESH_PERIOD):
            try:
                metrics.dht_peers.set(routing_table_size(dht))
            except Exception as err:
                logger.warning("routing table refresh failed error=%s", err)
    finally:
        ok = lifecycle.run_steps_with_deadline([("dht", dht.shutdown)], timeout=10.0)
        lifecycle.kill_descendants()
        logger.info("bootstrap stopped")
    return 0 if ok else 1
