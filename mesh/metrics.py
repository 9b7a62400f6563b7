"""Every Prometheus metric of the mesh's processes, in one place.

Rules: prefix ``mesh_``, base units (seconds, bytes), ``_total`` for counters, no peer ids and no raw paths as
labels (route templates only). A peer trains one run, so its metrics carry a ``run`` label for per-run dashboards.
"""

from __future__ import annotations

import platform
import time

from prometheus_client import Counter, Gauge, Histogram, Info

from mesh import __version__

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# every process
build_info = Info("mesh_build", "Version of the mesh and of its main dependencies, and the process's role")
uptime = Gauge("mesh_process_uptime_seconds", "Seconds since this process started")
dht_peers = Gauge("mesh_dht_peers", "DHT peers in this node's routing table")
http_disconnects = Counter(
    "mesh_http_client_disconnects_total", "Requests to /metrics or /healthz whose client hung up before the reply was sent"
)

# peer
steps = Counter("mesh_peer_steps_total", "Local steps (batches) taken", ["run"])
samples = Counter("mesh_peer_samples_total", "Samples this peer trained on", ["run"])
epoch = Gauge("mesh_peer_epoch", "Global epoch this peer is on", ["run"])
loss = Gauge("mesh_peer_loss", "Mean training loss over this peer's last epoch", ["run"])
eval_loss = Gauge("mesh_peer_eval_loss", "Loss on the task's held-out data at this peer's last evaluation", ["run"])
lr = Gauge("mesh_peer_lr", "The learning rate of this peer's optimizer (by the run's schedule and global epoch)", ["run"])
samples_per_second = Gauge("mesh_peer_global_samples_per_second", "Samples per second of the whole run, as seen here", ["run"])
step_duration = Histogram(
    "mesh_peer_step_duration_seconds",
    "One local step: forward, backward, hand-over to the optimizer",
    ["run"],
    buckets=STEP_BUCKETS,
)
averaging_rounds = Counter(
    "mesh_peer_averaging_rounds_total", "Gradient averaging rounds by outcome: ok, failed, local_only", ["run", "outcome"]
)
group_size = Gauge("mesh_peer_last_group_size", "Peers in the last averaging round (1 when alone)", ["run"])
matchmaking_duration = Histogram(
    "mesh_peer_matchmaking_duration_seconds",
    "From the start of a round's matchmaking until its group formed",
    ["run"],
    buckets=DURATION_BUCKETS,
)
allreduce_duration = Histogram(
    "mesh_peer_allreduce_duration_seconds",
    "From a formed group's go to the averaged gradients",
    ["run"],
    buckets=DURATION_BUCKETS,
)
clipped_outliers = Counter(
    "mesh_peer_clipped_outliers_total",
    "--aggregation clipped: parts of contributions this peer aggregated whose norm was over twice the group's median",
    ["run"],
)
unbounded_steps_skipped = Counter(
    "mesh_peer_clipped_skipped_steps_total",
    "--aggregation clipped: epochs whose round failed without the group, stepped with no gradient instead of the local one",
    ["run"],
)
behind_rounds = Counter(
    "mesh_peer_behind_rounds_total",
    "Gradient rounds this peer joined behind the group's epoch: its stale contribution was left out of the mean",
    ["run"],
)
refused = Counter(
    "mesh_peer_refused_total",
    "Requests, group members, records and states refused by the run's admission (docs/security.md), by reason",
    ["run", "reason"],
)
averaging_sent_bytes = Counter(
    "mesh_peer_averaging_sent_bytes_total",
    "Bytes this peer sent in gradient all-reduce (estimated from the tensors' wire size and the group size)",
    ["run"],
)
averaging_received_bytes = Counter(
    "mesh_peer_averaging_received_bytes_total",
    "Bytes this peer received in gradient all-reduce (estimated from the tensors' wire size and the group size)",
    ["run"],
)
tcp_sent_bytes = Counter(
    "mesh_peer_tcp_sent_bytes_total",
    "Bytes the training process sent over TCP, from the kernel's per-socket counters: the data plane, its rendezvous, "
    "HTTP (not hivemind's own traffic, which its libp2p daemon carries)",
    ["run"],
)
tcp_received_bytes = Counter(
    "mesh_peer_tcp_received_bytes_total", "Bytes the training process received over TCP (as mesh_peer_tcp_sent_bytes_total)", ["run"]
)
data_plane_builds = Counter(
    "mesh_peer_data_plane_builds_total", "Process groups built for the data plane (one per new group membership)", ["run"]
)
data_plane_fallbacks = Counter(
    "mesh_peer_data_plane_fallbacks_total",
    "Process groups that could not be built (that round fails; the next rounds use hivemind's all-reduce)",
    ["run"],
)
standing_rounds = Counter(
    "mesh_peer_standing_rounds_total", "Gradient rounds in a standing group: no matchmaking, the last round's process group", ["run"]
)
nccl_rounds = Counter("mesh_peer_nccl_rounds_total", "Gradient rounds whose gradients moved on NCCL (--data-plane nccl)", ["run"])
state_rounds_skipped = Counter(
    "mesh_peer_state_rounds_skipped_total",
    "Routine parameter rounds skipped because the gradient round's group (every live peer) found its parameters equal",
    ["run"],
)
outer_steps = Counter("mesh_peer_outer_steps_total", "--averaging diloco: outer optimizer steps taken", ["run"])
pseudo_gradient_norm = Gauge(
    "mesh_peer_pseudo_gradient_norm", "--averaging diloco: L2 norm of the pseudo-gradient of the last outer step", ["run"]
)
inner_steps = Gauge("mesh_peer_inner_steps_per_outer_step", "--averaging diloco: this peer's local steps in the last outer step", ["run"])
nonfinite_skips = Counter("mesh_peer_nonfinite_gradient_skips_total", "Local batches dropped for a NaN/inf gradient", ["run"])
parameter_recoveries = Counter(
    "mesh_peer_parameter_recoveries_total", "Times this peer's parameters were not finite and it took the run's state from peers", ["run"]
)
nonfinite_state_withheld = Counter(
    "mesh_peer_nonfinite_state_withheld_total",
    "Times this peer's state was not finite and it kept it out of a parameter round (taking the others' mean) or a download",
    ["run"],
)
state_downloads = Counter("mesh_peer_state_downloads_total", "Times this peer loaded the newest state from peers", ["run"])
state_download_duration = Histogram(
    "mesh_peer_state_download_duration_seconds", "Duration of a state download from peers", ["run"], buckets=DURATION_BUCKETS
)
device_info = Info("mesh_peer_device", "The device this peer trains on")

# coordinator
api_requests = Counter("mesh_api_requests_total", "HTTP requests by method, route template and status", ["method", "route", "status"])
api_request_duration = Histogram(
    "mesh_api_request_duration_seconds",
    "HTTP request latency by method and route template",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
api_store_duration = Histogram(
    "mesh_api_store_operation_duration_seconds", "Store operation latency by operation", ["operation"], buckets=LATENCY_BUCKETS
)
api_peers = Gauge("mesh_api_peers", "Peers known to the coordinator by run and status", ["run", "status"])
api_runs = Gauge("mesh_api_runs", "Runs known to the coordinator by status", ["status"])
api_peers_lost = Counter("mesh_api_peers_lost_total", "Peers that missed 3 heartbeats", ["run"])
api_ready = Gauge("mesh_api_ready", "1 when the coordinator's store answers, else 0")


def init_build_info(role: str) -> None:
    started = time.monotonic()
    uptime.set_function(lambda: time.monotonic() - started)
    versions = {"version": __version__, "role": role, "python": platform.python_version()}
    if role != "api":  # the coordinator stays free of torch unless it watches the DHT
        import hivemind
        import torch

        versions.update(torch=torch.__version__, hivemind=hivemind.__version__)
    build_info.info(versions)


def init_peer(run: str, device: str, gpu: str | None) -> None:
    """Create every labelled series at zero, so dashboards and rate() see them from the first scrape."""
    for outcome in ("ok", "failed", "local_only"):
        averaging_rounds.labels(run, outcome)
    from mesh.admission import REFUSAL_REASONS  # standard library only

    for reason in REFUSAL_REASONS:
        refused.labels(run, reason)
    for metric in (
        steps,
        samples,
        averaging_sent_bytes,
        averaging_received_bytes,
        nonfinite_skips,
        parameter_recoveries,
        nonfinite_state_withheld,
        state_downloads,
        data_plane_builds,
        data_plane_fallbacks,
        standing_rounds,
        nccl_rounds,
        state_rounds_skipped,
        clipped_outliers,
        unbounded_steps_skipped,
        behind_rounds,
        outer_steps,
        tcp_sent_bytes,
        tcp_received_bytes,
    ):
        metric.labels(run)
    for gauge in (epoch, group_size, samples_per_second):
        gauge.labels(run).set(0)
    for gauge in (eval_loss, lr):  # unknown until the first evaluation / epoch
        gauge.labels(run).set(float("nan"))
    device_info.info({"device": device, "gpu": gpu or ""})
