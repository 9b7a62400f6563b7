"""One-shot check of the mesh on a CUDA machine (``make gpu-check``): two real peers train the demo task on the GPU(s).

What it does, on 127.0.0.1:

1. starts ``mesh bootstrap`` and two ``mesh peer`` processes on the demo task (``--bf16``, ``--device cuda:0`` and
   ``cuda:1`` when there are two GPUs, else both on ``cuda:0``; ``--data-plane nccl``), each in its own session,
   logs in a temp workdir;
2. waits for both to leave at ``--max-epochs`` (within ``--timeout``), scraping their ``/metrics`` meanwhile;
3. checks: both exited 0, their final checkpoints hold equal parameters, each status file counts at least one
   successful averaging round (on two GPUs at least one on NCCL; on one GPU none, since NCCL refuses two ranks on
   one device), and the demo loss on a fixed batch fell from the initial parameters to the final ones;
4. measures step overhead: a plain PyTorch loop on the same device (same model, batch size, optimizer, autocast)
   against ``mesh_peer_step_duration_seconds`` of each peer, and the run's global samples/s.

    python -m tests.gpu_check                          # exits 2 without a CUDA device
    python -m tests.gpu_check --json gpu-check.json    # also writes the figures
    python -m tests.gpu_check --allow-cpu --max-epochs 3   # no GPU: the same flow on --device cpu (to validate it)

The last line is ``gpu-check: OK`` (exit 0) or ``gpu-check: FAILED (reason)`` (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mesh.optimizer import make_optimizer_factory, to_device
from mesh.tasks import load_task
from mesh.up import free_port
from tests.procs import MeshProcess, metric, metrics_page, reap, spawn

RUN = "gpucheck"
TASK = "demo"
EVAL_BATCH = (64, 12345)  # (batch size, seed) of the fixed batch the loss is compared on
LOG_TAIL_LINES = 40
SLOW_STEP = 0.5  # a histogram bucket bound: steps longer than this waited for averaging (matchmaking is 3 s)


class CheckFailed(Exception):
    """The mesh did not get as far as the checks (no bootstrap, a peer that did not leave in time)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the same flow on --device cpu")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in the peers and the plain loop (default: on with CUDA, off on CPU)",
    )
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--target-batch-size", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for both peers to leave at --max-epochs")
    parser.add_argument("--plain-steps", type=int, default=100, help="timed steps of the plain loop")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between /metrics scrapes")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, checkpoints) instead of deleting it")
    return parser.parse_args(argv)


# --- the plain loop and the loss ----------------------------------------------------------------------------------


def autocast_for(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_seconds_per_step(device: torch.device, bf16: bool, warmup_steps: int, steps: int) -> tuple[float, int]:
    """Seconds per step of a plain loop like a peer's (batch to device, forward, backward, optimizer step, loss.item()),
    and its batch size."""
    task = load_task(TASK)
    batch_size = task.defaults.get("batch_size", 16)
    torch.manual_seed(0)
    model = task.make_model().to(device)
    optimizer = make_optimizer_factory(task.defaults.get("optimizer", "adamw"), task.defaults.get("lr", 2e-3))(model.parameters())
    batches = task.make_batches(batch_size, 1)
    autocast = autocast_for(device, bf16)

    def step() -> None:
        batch = to_device(next(batches), device)
        with autocast:
            loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a peer syncs here too

    for _ in range(warmup_steps):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - started) / steps, batch_size


def demo_loss(parameters: dict[str, torch.Tensor] | None) -> float:
    """The demo task's loss on the fixed batch, in fp32 on the CPU: of the run's initial parameters (seed 0, the
    peers' default ``--seed``) when ``parameters`` is None, else of ``parameters``."""
    task = load_task(TASK)
    torch.manual_seed(0)
    model = task.make_model()
    if parameters is not None:
        model.load_state_dict(parameters)
    model.eval()
    batch = next(task.make_batches(*EVAL_BATCH))
    with torch.no_grad():
        return float(task.loss(model, batch))


# --- the mesh -----------------------------------------------------------------------------------------------------


def tail(process: MeshProcess, lines: int = LOG_TAIL_LINES) -> str:
    text = process.output().rstrip("\n").splitlines()[-lines:]
    return f"--- {process.name} (exit {process.proc.poll()}) {process.log} ---\n" + "\n".join(text)


def scrape(port: int) -> dict[str, float] | None:
    try:
        page = metrics_page(port)
    except OSError:
        return None
    return {
        "step_duration_sum": metric(page, "mesh_peer_step_duration_seconds_sum", run=RUN),
        "step_duration_count": metric(page, "mesh_peer_step_duration_seconds_count", run=RUN),
        "steps_total": metric(page, "mesh_peer_steps_total", run=RUN),
        "samples_total": metric(page, "mesh_peer_samples_total", run=RUN),
        "epoch": metric(page, "mesh_peer_epoch", run=RUN),
        "global_samples_per_second": metric(page, "mesh_peer_global_samples_per_second", run=RUN),
        "buckets": buckets(page, "mesh_peer_step_duration_seconds"),
        "time": time.monotonic(),
    }


def buckets(page: str, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets of run ``RUN`` as sorted (upper bound, count), +Inf included."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [
        (float(sample.labels["le"]), sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == f"{name}_bucket" and sample.labels.get("run") == RUN
    ]
    return sorted(found)


def median_bound(cumulative: list[tuple[float, float]]) -> float | None:
    """The upper bound of the bucket holding the median observation (None without observations)."""
    total = cumulative[-1][1] if cumulative else 0
    return next((bound for bound, count in cumulative if count >= total / 2), None) if total else None


def slow_steps(cumulative: list[tuple[float, float]], over: float) -> int:
    """Observations above the bucket bound ``over`` (the steps that waited for an averaging round)."""
    below = next((count for bound, count in cumulative if bound == over), 0)
    return int(cumulative[-1][1] - below) if cumulative else 0


def run_mesh(args, workdir: Path, devices: list[str], bf16: bool, cpu: bool, procs: list[MeshProcess]) -> dict:
    """Start the bootstrap and both peers, wait for the peers to leave; returns the last and first-trained scrapes."""
    addr_file = workdir / "bootstrap.addr"
    bootstrap = spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr_file)], workdir)
    procs.append(bootstrap)
    deadline = time.monotonic() + 60
    while not (addr_file.exists() and addr_file.read_text().split()):
        if bootstrap.proc.poll() is not None or time.monotonic() > deadline:
            raise CheckFailed("the bootstrap wrote no address within 60 s")
        time.sleep(0.2)
    join = addr_file.read_text().split()[0]

    ports = [free_port() for _ in devices]
    peers: list[MeshProcess] = []
    for i, (device, port) in enumerate(zip(devices, ports)):
        name = f"peer{i}"
        peer = spawn(
            name,
            [
                "peer",
                "--join",
                join,
                "--run",
                RUN,
                "--task",
                TASK,
                "--host",
                "127.0.0.1",
                "--metrics-port",
                str(port),
                "--min-peers",
                "2",
                "--max-epochs",
                str(args.max_epochs),
                "--checkpoint-dir",
                str(workdir / name),
                "--status-file",
                str(workdir / f"{name}.json"),
                "--target-batch-size",
                str(args.target_batch_size),
                "--device",
                device,
                # NCCL where the two peers are on two GPUs; on one GPU (or CPU) their group stays on gloo
                "--data-plane",
                "nccl",
                *(["--bf16"] if bf16 else []),
                *(["--threads", "1"] if cpu else []),
            ],
            workdir,
        )
        procs.append(peer)
        peers.append(peer)

    last: dict[str, dict] = {}
    first_trained: dict[str, dict] = {}  # the first scrape after epoch 1, for a measured samples/s
    deadline = time.monotonic() + args.timeout
    while any(p.proc.poll() is None for p in peers):
        if time.monotonic() > deadline:
            raise CheckFailed(f"the peers did not leave at epoch {args.max_epochs} within {args.timeout:g} s")
        for peer, port in zip(peers, ports):
            if peer.proc.poll() is not None:
                continue
            peer.remember_descendants()
            seen = scrape(port)
            if seen is not None:
                last[peer.name] = seen
                if seen["epoch"] >= 1 and peer.name not in first_trained:
                    first_trained[peer.name] = seen
        time.sleep(args.scrape_every)
    return {"peers": peers, "last": last, "first_trained": first_trained}


# --- checks -------------------------------------------------------------------------------------------------------


def check_results(peers: list[MeshProcess], devices: list[str], max_epochs: int, report: dict) -> list[str]:
    failures: list[str] = []
    for peer in peers:
        if peer.proc.returncode != 0:
            failures.append(f"{peer.name} exited {peer.proc.returncode}")

    for peer, device in zip(peers, devices):
        status = peer.status()
        ok_rounds = (status.get("rounds") or {}).get("ok", 0)
        report["peers"].setdefault(peer.name, {}).update(
            device=status.get("device"),
            epoch=status.get("epoch"),
            rounds=status.get("rounds"),
            state=status.get("state"),
            samples=status.get("samples"),
            local_steps=status.get("local_steps"),
            nccl_rounds=status.get("nccl_rounds"),
        )
        if not status:
            failures.append(f"{peer.name} wrote no status file")
            continue
        if ok_rounds < 1:
            failures.append(f"{peer.name} had no successful averaging round (rounds {status.get('rounds')})")
        # two GPUs: the data plane moves the gradients on NCCL; one GPU (NCCL refuses two ranks on it) or CPU: gloo
        on_nccl = len(set(devices)) == len(devices) and all(d.startswith("cuda") for d in devices)
        nccl_rounds = status.get("nccl_rounds") or 0
        if on_nccl and nccl_rounds < 1:
            failures.append(f"{peer.name} is on its own GPU but no round moved on NCCL (status {status})")
        if not on_nccl and nccl_rounds:
            failures.append(f"{peer.name} shares a device with the other peer, yet {nccl_rounds} rounds ran on NCCL")
        if status.get("device") != device:
            failures.append(f"{peer.name} trained on {status.get('device')!r}, not {device!r}")
        if (status.get("epoch") or 0) < max_epochs:
            failures.append(f"{peer.name} left at epoch {status.get('epoch')}, before {max_epochs}")

    params = {}
    for peer in peers:
        try:
            params[peer.name] = peer.load_parameters()
        except Exception as exc:  # missing or unreadable checkpoint: report, go on with the other checks
            failures.append(f"{peer.name} has no readable checkpoint ({type(exc).__name__}: {exc})")
    if len(params) == len(peers) == 2:
        a, b = (params[p.name] for p in peers)
        try:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
            report["parameters_equal"] = True
        except AssertionError as exc:
            report["parameters_equal"] = False
            first = str(exc).strip().splitlines()
            failures.append("the peers' final parameters differ: " + " ".join(first[:4]))

    initial = demo_loss(None)
    report["loss_initial"] = initial
    finals = {}
    for name, state in params.items():
        finals[name] = demo_loss(state)
        report["peers"][name]["loss_final"] = finals[name]
        if not (math.isfinite(finals[name]) and finals[name] < initial):
            failures.append(f"{name}'s loss did not fall: {initial:.4f} -> {finals[name]:.4f}")
    return failures


def overhead(plain: float, batch_size: int, mesh: dict, report: dict) -> None:
    """Fill ``report`` with the step figures from the last scrapes, and print them."""
    last, first_trained = mesh["last"], mesh["first_trained"]
    report["plain_s_per_step"] = plain
    report["plain_samples_per_second"] = batch_size / plain
    print(f"  plain loop: {plain * 1e3:.2f} ms/step ({batch_size / plain:.1f} samples/s, batch {batch_size})")
    measured = 0.0
    for peer in mesh["peers"]:
        seen = last.get(peer.name)
        entry = report["peers"].setdefault(peer.name, {})
        if not seen or not seen["step_duration_count"]:
            print(f"  {peer.name}: no /metrics scrape with steps")
            continue
        per_step = seen["step_duration_sum"] / seen["step_duration_count"]
        median, slow = median_bound(seen["buckets"]), slow_steps(seen["buckets"], SLOW_STEP)
        entry.update(
            mesh_s_per_step=per_step,
            ratio_mesh_over_plain=per_step / plain,
            steps=seen["step_duration_count"],
            median_step_at_most_s=median,
            steps_over_slow_s=slow,
            global_samples_per_second=seen["global_samples_per_second"],
            last_scraped_epoch=seen["epoch"],
        )
        print(
            f"  {peer.name}: {per_step * 1e3:.2f} ms/step over {int(seen['step_duration_count'])} steps "
            f"(mesh/plain {per_step / plain:.2f}; median <= {(median or math.nan) * 1e3:g} ms, {slow} step(s) over {SLOW_STEP:g} s), "
            f"global {seen['global_samples_per_second']:.1f} samples/s at epoch {int(seen['epoch'])}"
        )
        start = first_trained.get(peer.name)
        if start and seen["time"] > start["time"]:
            measured += (seen["samples_total"] - start["samples_total"]) / (seen["time"] - start["time"])
    # from the status files (written as each peer leaves), not the scrapes, which can miss the last epoch
    trained = sum(report["peers"][p.name].get("samples") or 0 for p in mesh["peers"])
    epochs = min((report["peers"][p.name].get("epoch") or 0) for p in mesh["peers"])
    if trained and epochs:
        target = report["target_batch_size"]
        report["samples_per_epoch"] = trained / epochs
        print(
            f"  samples trained by both peers: {int(trained)} in {int(epochs)} epoch(s), {trained / epochs:.0f} per epoch "
            f"(target batch {target})"
        )
        if trained / epochs > 1.5 * target:
            print(
                f"  note: each epoch took {trained / epochs / target:.1f}x the target batch: the peers' progress trackers "
                "did not count each other's samples (hivemind refreshes the swarm's progress on its own schedule)"
            )
    gauges = [report["peers"][p.name].get("global_samples_per_second") for p in mesh["peers"]]
    gauges = [g for g in gauges if g]
    report["global_samples_per_second"] = sum(gauges) / len(gauges) if gauges else None
    report["measured_samples_per_second"] = measured or None
    if gauges:
        print(
            f"  global samples/s: {report['global_samples_per_second']:.1f} (peers' gauge, mean), "
            f"{measured:.1f} (sum of peers' samples_total rates after epoch 1); plain {batch_size / plain:.1f} x 2 peers"
        )


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is false); nothing to check (--allow-cpu runs on CPU)")
        return 2
    if cuda:
        devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cuda:0", "cuda:0"]
        bf16 = True if args.bf16 is None else args.bf16
        names = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices})
        print(
            f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s): "
            f"{', '.join(names)}; peers on {' and '.join(devices)}, bf16={bf16}"
        )
    else:
        devices, bf16 = ["cpu", "cpu"], bool(args.bf16)
        torch.set_num_threads(1)  # like the peers' --threads 1
        print(f"gpu-check: no CUDA device, --allow-cpu: running on cpu (torch {torch.__version__}, bf16={bf16})")

    report: dict = {
        "devices": devices,
        "bf16": bf16,
        "max_epochs": args.max_epochs,
        "target_batch_size": args.target_batch_size,
        "peers": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="mesh-gpu-check-"))
    procs: list[MeshProcess] = []
    failures: list[str] = []
    try:
        device = torch.device(devices[0])
        plain, batch_size = plain_seconds_per_step(device, bf16, args.warmup_steps, args.plain_steps)
        if cuda:
            torch.cuda.empty_cache()  # the loop's model is gone; leave the memory to the peers
        print(f"gpu-check: plain loop on {device}: {plain * 1e3:.2f} ms/step; starting the mesh (logs in {workdir})")
        started = time.monotonic()
        try:
            mesh = run_mesh(args, workdir, devices, bf16, not cuda, procs)
        except CheckFailed as exc:
            failures.append(str(exc))
            mesh = None
        if mesh is not None:
            report["mesh_seconds"] = time.monotonic() - started
            print(f"gpu-check: both peers left after {report['mesh_seconds']:.0f} s")
            failures += check_results(mesh["peers"], devices, args.max_epochs, report)
            overhead(plain, batch_size, mesh, report)
            if "loss_initial" in report:
                finals = ", ".join(f"{n} {v['loss_final']:.4f}" for n, v in report["peers"].items() if "loss_final" in v)
                print(f"  loss on the fixed batch: initial {report['loss_initial']:.4f} -> final {finals}")
        if failures:
            print("\n".join(tail(p) for p in procs))
    except Exception as exc:  # anything unexpected still ends in the one-line verdict, after the logs
        failures.append(f"{type(exc).__name__}: {exc}")
        print("\n".join(tail(p) for p in procs))
    finally:
        for process in procs:
            reap(process)
        if failures or args.keep:
            print(f"gpu-check: logs and checkpoints kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report["ok"], report["failures"] = not failures, failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    for reason in failures:
        print(f"  failed: {reason}")
    print("gpu-check: OK" if not failures else f"gpu-check: FAILED ({'; '.join(failures)})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
