"""Training throughput benchmark: the mesh against plain PyTorch and gloo DDP, measured in the same run (not a test).

What it measures, for each case (a task and an epoch size, ``--cases``), samples per second of one model trained
four ways on this machine, each process on one torch thread (``--threads``) so that processes share the cores
alike in every setup:

- ``plain``: one process, a plain PyTorch loop (forward, backward, optimizer step every batch);
- ``ddp_eq``: two processes, ``DistributedDataParallel`` over gloo on 127.0.0.1, accumulating (``no_sync``) to the
  mesh's global batch: one all-reduce and one optimizer step per ``target_batch_size`` samples over both ranks —
  the same optimization as the mesh's, and so the fair baseline;
- ``ddp_step``: the same two ranks, an all-reduce and a step every batch (DDP as usually run);
- ``mesh``: a bootstrap and two ``mesh peer`` processes (hivemind DHT and matchmaking, gradients on the data
  plane every epoch), as a user runs them. Throughput is the sum over both peers of ``mesh_peer_samples_total``
  from their ``/metrics`` over the window, after both passed epoch ``--warmup-epochs``. Alongside it, the share of
  the machine's CPU each kind of process used over the window (psutil): the trainers (the peers' main processes),
  their helpers (DHT, averagers, libp2p daemons) and the bootstrap (with its daemon);
- ``mesh_clipped`` (with ``--clipped``): the same with ``--aggregation clipped``, right after each ``mesh`` run;
  ``clipped/mesh`` is the median of those pairs' ratios (the cost of bounding each member's contribution).

DDP_eq and the mesh run ``--repeats`` times (3), alternating, and ``mesh/ddp_eq`` is the median of the back-to-back
pairs' ratios: one 30-s window varies by about 10 % here, and the machine drifts between setups.

Then the straggler case (``--straggler``): three peers; after a healthy window, one peer's whole process group is
SIGSTOPped for ``--stop-seconds`` (45): the survivors' epoch rate over the stop, and over the part of it after one
averaging timeout, against the healthy rate.

    python -m tests.bench.training                                  # every case, then the straggler
    python -m tests.bench.training --cases demo:512 --seconds 20 --no-straggler
    python -m tests.bench.training --cases tests.bench.models:mlp25m:512 --clipped --no-straggler
    python -m tests.bench.training --json out.json

Run it on a quiet machine: it uses every core, and any other load skews the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.optimizer import make_optimizer_factory
from mesh.tasks import load_task
from mesh.up import free_port
from tests.procs import metric, metrics_page, spawn

CASES = "demo:512,demo:4096,tests.bench.models:mlp25m:512"


def _settings(task_name: str, batch_size: int | None) -> tuple:
    task = load_task(task_name)
    return task, batch_size or task.defaults.get("batch_size", 32), task.defaults.get("optimizer", "sgd"), task.defaults.get("lr", 0.01)


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def run_plain(case: dict, args) -> tuple[float, float]:
    """(samples/s, seconds per batch) of one process."""
    torch.set_num_threads(args.threads)
    task, batch_size, opt_name, lr = _settings(case["task"], args.batch_size)
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = make_optimizer_factory(opt_name, lr)(model.parameters())
    batches = task.make_batches(batch_size, 1)
    started = time.monotonic()
    window, samples, steps = None, 0, 0
    while True:
        now = time.monotonic()
        if window is None and now - started >= args.warmup:
            window, samples, steps = now, 0, 0
        if window is not None and now - window >= args.seconds and steps >= 3:
            return samples / (now - window), (now - window) / steps
        optimizer.zero_grad(set_to_none=True)
        batch = next(batches)
        task.loss(model, batch).backward()
        optimizer.step()
        samples, steps = samples + _batch_len(batch), steps + 1


def _ddp_rank(rank: int, world: int, port: int, case: dict, args, accumulate: int, steps: tuple[int, int], results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        task, batch_size, opt_name, lr = _settings(case["task"], args.batch_size)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(task.make_model())
        optimizer = make_optimizer_factory(opt_name, lr)(model.parameters())
        batches = task.make_batches(batch_size, rank + 1)

        def optimizer_step() -> int:
            samples = 0
            for micro in range(accumulate):  # no_sync: gradients add up locally, the last backward all-reduces
                batch = next(batches)
                with model.no_sync() if micro < accumulate - 1 else nullcontext():
                    (task.loss(model, batch) / accumulate).backward()
                samples += _batch_len(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return samples

        warmup, timed = steps
        for _ in range(warmup):
            optimizer_step()
        dist.barrier()
        started, samples = time.monotonic(), 0
        for _ in range(timed):
            samples += optimizer_step()
        results[rank] = samples / (time.monotonic() - started)
    finally:
        dist.destroy_process_group()


def run_ddp(case: dict, args, seconds_per_batch: float, equal_batch: bool, world: int = 2) -> float:
    """Global samples/s of a ``world``-rank DDP job, for about ``--seconds`` (given one process's batch time).
    ``equal_batch``: accumulate to the case's target batch over all ranks; otherwise step every batch."""
    _, batch_size, _, _ = _settings(case["task"], args.batch_size)
    accumulate = max(1, case["target"] // (world * batch_size)) if equal_batch else 1
    per_step = seconds_per_batch * accumulate
    steps = (max(1, int(args.warmup / per_step)), max(3, int(args.seconds / per_step)))
    results = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(world, free_port(), case, args, accumulate, steps, results), nprocs=world, join=True)
    return sum(results.values())


class Mesh:
    """A bootstrap and peers as child processes (each in its own session), stopped at exit."""

    def __init__(self, case: dict, args, peers: int, extra: tuple[str, ...] = ()) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
        self.procs: list[subprocess.Popen] = []
        addr_file = self.workdir / "bootstrap.addr"
        self.bootstrap = self._start("bootstrap", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr_file))
        deadline = time.monotonic() + 60
        while not addr_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"no bootstrap address within 60 s; see {self.workdir}/bootstrap.log")
            time.sleep(0.2)
        join = addr_file.read_text().split()[0]
        self.ports = [free_port() for _ in range(peers)]
        self.peers = [
            self._start(
                f"peer{i}",
                "peer",
                "--join",
                join,
                "--run",
                "bench",
                "--task",
                case["task"],
                "--host",
                "127.0.0.1",
                "--threads",
                str(args.threads),
                "--metrics-port",
                str(port),
                "--min-peers",
                str(peers),
                "--target-batch-size",
                str(case["target"]),
                *extra,
                *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
            )
            for i, port in enumerate(self.ports)
        ]

    def _start(self, name: str, *cli: str) -> subprocess.Popen:
        proc = spawn(name, list(cli), self.workdir).proc  # the tests' launcher: own session, one thread, log file
        self.procs.append(proc)
        return proc

    def read(self, ports: list[int] | None = None) -> list[tuple[float, float]]:
        """(samples trained, epoch) of each peer, from its /metrics ([] while a page does not answer)."""
        try:
            pages = [metrics_page(port) for port in ports or self.ports]
        except OSError:
            return []
        return [(metric(p, "mesh_peer_samples_total"), metric(p, "mesh_peer_epoch")) for p in pages]

    def wait_epoch(self, epoch: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not ((seen := self.read()) and all(e >= epoch for _, e in seen)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"the mesh did not reach epoch {epoch}; logs in {self.workdir}")
            time.sleep(0.5)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the trainers, their helper processes, and the bootstrap with its daemon."""
        totals = {"trainers": 0.0, "helpers": 0.0, "bootstrap": 0.0}
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in tree:
                try:
                    times = member.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                kind = "bootstrap" if proc is self.bootstrap else "trainers" if member.pid == proc.pid else "helpers"
                totals[kind] += times.user + times.system
        return totals

    def close(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _round_counts(mesh: "Mesh") -> dict[str, float]:
    """Gradient rounds so far, summed over the peers: by outcome, and the ok ones in a standing group."""
    pages = [metrics_page(port) for port in mesh.ports]
    counts = {
        outcome: sum(metric(p, "mesh_peer_averaging_rounds_total", outcome=outcome) for p in pages)
        for outcome in ("ok", "failed", "local_only")
    }
    counts["standing"] = sum(metric(p, "mesh_peer_standing_rounds_total") for p in pages)
    # routine parameter rounds skipped because the members' parameters were found equal (absent before 651e616)
    counts["state_skipped"] = sum(metric(p, "mesh_peer_state_rounds_skipped_total") for p in pages)
    return counts


def run_mesh(case: dict, args, aggregation: str = "mean") -> tuple[float, dict[str, float], dict[str, float]]:
    """(global samples/s, CPU share of trainers / helpers / bootstrap, rounds in the window) of two peers."""
    mesh = Mesh(case, args, peers=2, extra=("--aggregation", aggregation))
    try:
        mesh.wait_epoch(args.warmup_epochs)
        rounds_before = _round_counts(mesh)
        cpu_before, before, t0 = mesh.cpu_seconds(), sum(s for s, _ in mesh.read()), time.monotonic()
        time.sleep(args.seconds)
        cpu_after, after, t1 = mesh.cpu_seconds(), sum(s for s, _ in mesh.read()), time.monotonic()
        rounds = {k: v - rounds_before[k] for k, v in _round_counts(mesh).items()}
        capacity = (t1 - t0) * psutil.cpu_count()
        return (after - before) / (t1 - t0), {k: (cpu_after[k] - cpu_before[k]) / capacity for k in cpu_after}, rounds
    finally:
        mesh.close()


def run_straggler(args) -> dict[str, float]:
    """Survivors' epochs/s: healthy, during a SIGSTOP of one of three peers, and during it after one averaging
    timeout."""
    case = {"task": "demo", "target": args.straggler_target}
    mesh = Mesh(case, args, peers=3, extra=("--averaging-timeout", str(args.averaging_timeout)))
    survivors = mesh.ports[:2]

    def epoch() -> float:
        seen = mesh.read(survivors)
        return min(e for _, e in seen) if seen else float("nan")

    def rate(seconds: float) -> float:
        start, t0 = epoch(), time.monotonic()
        time.sleep(seconds)
        return (epoch() - start) / (time.monotonic() - t0)

    try:
        mesh.wait_epoch(args.warmup_epochs)
        healthy = rate(args.stop_seconds)
        os.killpg(mesh.peers[2].pid, signal.SIGSTOP)
        stopped_at, start = time.monotonic(), epoch()
        time.sleep(min(args.averaging_timeout, args.stop_seconds))
        after_timeout = rate(max(1.0, args.stop_seconds - (time.monotonic() - stopped_at)))
        during = (epoch() - start) / (time.monotonic() - stopped_at)
        os.killpg(mesh.peers[2].pid, signal.SIGCONT)
        return {
            "healthy_epochs_per_s": healthy,
            "stopped_epochs_per_s": during,
            "after_timeout_epochs_per_s": after_timeout,
            "during/healthy": during / healthy if healthy else float("nan"),
            "after_timeout/healthy": after_timeout / healthy if healthy else float("nan"),
        }
    finally:
        mesh.close()


def parse_cases(text: str) -> list[dict]:
    cases = []
    for item in filter(None, text.split(",")):
        task, _, target = item.rpartition(":")
        cases.append({"task": task, "target": int(target), "name": f"{task.rpartition(':')[2] or task}@{target}"})
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES, help="TASK:TARGET_BATCH_SIZE, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="per process and step (the task's default)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per setup")
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back DDP_eq / mesh pairs per case (median)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window (plain, DDP)")
    parser.add_argument("--warmup-epochs", type=int, default=3, help="mesh: epochs before the window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clipped", action="store_true", help="also the mesh with --aggregation clipped, after each mesh run")
    parser.add_argument("--straggler", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--straggler-target", type=int, default=512)
    parser.add_argument("--stop-seconds", type=float, default=45.0)
    parser.add_argument("--averaging-timeout", type=float, default=30.0, help="the straggler run's (the default run's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    for case in parse_cases(args.cases):
        plain, seconds_per_batch = run_plain(case, args)
        ddp_step = run_ddp(case, args, seconds_per_batch, equal_batch=False)
        # the fair pair, alternated: a single 30-s window of one setup varies by about 10 % on this machine, and
        # the machine drifts between setups; the ratio of each back-to-back pair, then the median of the pairs
        pairs, cpus, windows, clipped = [], [], [], []
        for _ in range(args.repeats):
            ddp_eq = run_ddp(case, args, seconds_per_batch, equal_batch=True)
            mesh, cpu, rounds = run_mesh(case, args)
            pairs.append((ddp_eq, mesh))
            cpus.append(cpu)
            windows.append(rounds)
            if args.clipped:  # --aggregation clipped right after the plain mean it is compared with
                clipped.append(run_mesh(case, args, "clipped")[0])
        pair_ratios = [mesh / ddp_eq for ddp_eq, mesh in pairs]
        results = {
            "plain": plain,
            "ddp_eq": statistics.median(ddp_eq for ddp_eq, _ in pairs),
            "ddp_step": ddp_step,
            "mesh": statistics.median(mesh for _, mesh in pairs),
        }
        ratios = {
            "mesh/ddp_eq": statistics.median(pair_ratios),
            "mesh/plain": results["mesh"] / results["plain"],
            "ddp_eq/plain": results["ddp_eq"] / results["plain"],
            "mesh/ddp_step": results["mesh"] / results["ddp_step"],
        }
        if clipped:
            results["mesh_clipped"] = statistics.median(clipped)
            ratios["clipped/mesh"] = statistics.median(c / mesh for c, (_, mesh) in zip(clipped, pairs))
        cpu = {kind: statistics.median(c[kind] for c in cpus) for kind in cpus[0]}
        report["cases"][case["name"]] = {
            "samples_per_second": results,
            "ratios": ratios,
            "pairs": [{"ddp_eq": ddp_eq, "mesh": mesh, "mesh/ddp_eq": mesh / ddp_eq} for ddp_eq, mesh in pairs],
            "mesh_cpu_share": cpu,
            "mesh_rounds": windows,
        }
        print(
            f"{case['name']}: threads={args.threads} seconds={args.seconds:g} repeats={args.repeats} (2 processes each but plain)",
            flush=True,
        )
        print("  " + " ".join(f"{k}={v:.1f}" for k, v in results.items()) + " samples/s (medians)")
        print("  ratio: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()) + "  (target mesh/ddp_eq >= 0.9)")
        print("  mesh/ddp_eq of each pair: " + " ".join(f"{r:.2f}" for r in pair_ratios), flush=True)
        print("  mesh CPU share of the machine: " + " ".join(f"{k}={v:.0%}" for k, v in cpu.items()), flush=True)
        print(
            "  mesh rounds per window (both peers; standing = ok without matchmaking, state_skipped = routine parameter "
            "rounds found unneeded): " + " | ".join(" ".join(f"{k}={v:.0f}" for k, v in w.items()) for w in windows),
            flush=True,
        )
    if args.straggler:
        straggler = run_straggler(args)
        report["straggler"] = straggler
        print(
            f"straggler: 3 peers, demo@{args.straggler_target}, one SIGSTOPped {args.stop_seconds:g}s, "
            f"averaging timeout {args.averaging_timeout:g}s"
        )
        print("  " + " ".join(f"{k}={v:.3f}" for k, v in straggler.items()) + "  (target after_timeout/healthy >= 0.7)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
