"""Every Prometheus metric of the mesh's processes, in one place. Prefix ``mesh_``, base units, no peer ids."""

from __future__ import annotations

import logging
import platform

from prometheus_client import Counter, Gauge, Histogram, Info

from mesh import __version__

logger = logging.getLogger(__name__)

build_info = Info("mesh_build", "Version of the mesh and of its main dependencies")

# peer
steps = Counter("mesh_peer_steps_total", "Local optimizer steps (batches) taken")
samples = Counter("mesh_peer_samples_total", "Samples this peer trained on")
epoch = Gauge("mesh_peer_epoch", "Global epoch this peer is on")
loss = Gauge("mesh_peer_loss", "Mean training loss over the last epoch")
step_duration = Histogram(
    "mesh_peer_step_duration_seconds",
    "Duration of one local step (forward, backward, accumulation)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
averaging_rounds = Counter(
    "mesh_peer_averaging_rounds_total", "Gradient averaging rounds by outcome (ok, failed, local_only)", ["outcome"]
)
group_size = Gauge("mesh_peer_last_group_size", "Peers in the last averaging round (1 when averaged alone)")
nonfinite_skips = Counter("mesh_peer_nonfinite_gradient_skips_total", "Local batches dropped for a NaN/inf gradient")
state_downloads = Counter("mesh_peer_state_downloads_total", "Times this peer loaded the newest state from peers")
samples_per_second = Gauge("mesh_peer_global_samples_per_second", "Samples per second of the whole run, as seen here")

# bootstrap
dht_peers = Gauge("mesh_dht_peers", "DHT peers in this node's routing table")
uptime = Gauge("mesh_process_uptime_seconds", "Seconds since this process started")


def init_build_info(role: str) -> None:
    import hivemind
    import torch

    build_info.info(
        {
            "version": __version__,
            "role": role,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "hivemind": hivemind.__version__,
        }
    )
    for outcome in ("ok", "failed", "local_only"):
        averaging_rounds.labels(outcome)

