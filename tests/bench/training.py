"""Training throughput benchmark: the mesh against plain PyTorch and gloo DDP, measured in the same run (not a test).

What it measures: samples per second of one model trained three ways on this machine, each process with one torch
thread (``--threads``) so that two processes share two cores the same way in every case:

- ``plain``: one process, a plain PyTorch loop (forward, backward, optimizer step) — the ceiling for one process;
- ``gloo``: two processes, ``DistributedDataParallel`` over gloo on 127.0.0.1, gradients all-reduced every step —
  what a scheduled, fixed-world-size job gets;
- ``mesh``: a bootstrap and two ``mesh peer`` processes on 127.0.0.1 (hivemind's DHT, matchmaking, all-reduce every
  ``--target-batch-size`` global samples, parameter averaging each epoch), as a user runs them.

Each runs for ``--seconds`` after a warm-up (``--warmup`` seconds; for the mesh, until both peers passed epoch 1),
and throughput is samples in that window over its length: for the mesh, the sum over both peers of
``mesh_peer_samples_total`` scraped from their ``/metrics``. Printed as figures and as ratios: mesh/gloo is what the
mesh costs against a scheduled job, gloo/plain what two processes on two cores give over one.

    python -m tests.bench.training                       # demo task, 30 s each
    python -m tests.bench.training --task regression --seconds 20 --json out.json

Run it on a quiet machine: it uses both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.tasks import load_task
from mesh.trainer import make_optimizer_factory
from mesh.up import free_port
from tests.procs import metric, metrics_page

REPO = Path(__file__).resolve().parents[2]


def _settings(task_name: str, batch_size: int | None) -> tuple:
    task = load_task(task_name)
    return task, batch_size or task.defaults.get("batch_size", 32), task.defaults.get("optimizer", "sgd"), task.defaults.get("lr", 0.01)


def _train_for(task, model, optimizer, batches, warmup: float, seconds: float) -> tuple[int, int, float]:
    """Train until warm-up then ``seconds`` have passed: (samples, steps, seconds) of the measured window."""
    started = time.monotonic()
    window_start, samples, steps = None, 0, 0
    while True:
        now = time.monotonic()
        if window_start is None and now - started >= warmup:
            window_start, samples, steps = now, 0, 0
        if window_start is not None and now - window_start >= seconds:
            return samples, steps, now - window_start
        samples += _step(task, model, optimizer, next(batches))
        steps += 1


def _train_steps(task, model, optimizer, batches, warmup_steps: int, steps: int) -> tuple[int, float]:
    """A fixed number of steps (ranks of a DDP job must stop together): (samples, seconds) after the warm-up."""
    for _ in range(warmup_steps):
        _step(task, model, optimizer, next(batches))
    started, samples = time.monotonic(), 0
    for _ in range(steps):
        samples += _step(task, model, optimizer, next(batches))
    return samples, time.monotonic() - started


def _step(task, model, optimizer, batch) -> int:
    optimizer.zero_grad(set_to_none=True)
    task.loss(model, batch).backward()
    optimizer.step()
    return _batch_len(batch)


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def run_plain(args) -> tuple[float, float]:
    """(samples/s, steps/s) of one process."""
    torch.set_num_threads(args.threads)
    task, batch_size, opt_name, lr = _settings(args.task, args.batch_size)
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = make_optimizer_factory(opt_name, lr)(model.parameters())
    samples, steps, window = _train_for(task, model, optimizer, task.make_batches(batch_size, 1), args.warmup, args.seconds)
    return samples / window, steps / window


def _gloo_rank(rank: int, world: int, port: int, args, steps: tuple[int, int], results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        task, batch_size, opt_name, lr = _settings(args.task, args.batch_size)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(task.make_model())
        optimizer = make_optimizer_factory(opt_name, lr)(model.parameters())
        samples, window = _train_steps(task, model, optimizer, task.make_batches(batch_size, rank + 1), *steps)
        results[rank] = samples / window
    finally:
        dist.destroy_process_group()


def run_gloo(args, plain_steps_per_second: float, world: int = 2) -> float:
    """Global samples/s of a ``world``-rank DDP job, run for as many steps as one process makes in ``--seconds``
    (so, on a machine with a core per rank, about ``--seconds`` long)."""
    steps = (max(3, int(plain_steps_per_second * args.warmup)), max(10, int(plain_steps_per_second * args.seconds)))
    results = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(world, free_port(), args, steps, results), nprocs=world, join=True)
    return sum(results.values())


def _scrape_samples(port: int) -> tuple[float, float]:
    """(samples trained, epoch) from one peer's /metrics."""
    page = metrics_page(port)
    return metric(page, "mesh_peer_samples_total"), metric(page, "mesh_peer_epoch")


def run_mesh(args) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    procs: list[subprocess.Popen] = []

    def start(name: str, *cli: str) -> None:
        log = open(workdir / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "mesh", *cli], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        addr_file = workdir / "bootstrap.addr"
        start("bootstrap", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr_file))
        deadline = time.monotonic() + 60
        while not addr_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"no bootstrap address within 60 s; see {workdir}/bootstrap.log")
            time.sleep(0.5)
        join = addr_file.read_text().split()[0]
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            start(
                f"peer{i}", "peer", "--join", join, "--run", "bench", "--task", args.task, "--host", "127.0.0.1",
                "--threads", str(args.threads), "--metrics-port", str(port), "--min-peers", "2",
                "--target-batch-size", str(args.target_batch_size), "--checkpoint-dir", str(workdir / f"ckpt{i}"),
                *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
            )

        def read() -> list[tuple[float, float]]:
            try:
                return [_scrape_samples(port) for port in ports]
            except OSError:
                return []

        deadline = time.monotonic() + 300
        while not ((seen := read()) and all(epoch >= 1 for _, epoch in seen)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"the mesh did not reach epoch 1; logs in {workdir}")
            time.sleep(1.0)
        before, t0 = sum(s for s, _ in read()), time.monotonic()
        time.sleep(args.seconds)
        after, t1 = sum(s for s, _ in read()), time.monotonic()
        return (after - before) / (t1 - t0)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="demo")
    parser.add_argument("--batch-size", type=int, default=None, help="per process and step (the task's default)")
    parser.add_argument("--target-batch-size", type=int, default=512, help="the mesh's global batch per epoch")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    plain, plain_steps = run_plain(args)
    results = {"plain": plain, "gloo_2": run_gloo(args, plain_steps), "mesh_2": run_mesh(args)}
    ratios = {
        "mesh_2/gloo_2": results["mesh_2"] / results["gloo_2"],
        "mesh_2/plain": results["mesh_2"] / results["plain"],
        "gloo_2/plain": results["gloo_2"] / results["plain"],
    }
    print(f"task={args.task} threads={args.threads} seconds={args.seconds:g} target_batch_size={args.target_batch_size}")
    print("  " + " ".join(f"{name}={value:.1f} samples/s" for name, value in results.items()))
    print("  ratio: " + " ".join(f"{name}={value:.2f}" for name, value in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "samples_per_second": results,
                                         "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
