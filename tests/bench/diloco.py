"""DiLoCo benchmark: wall time and bytes for two workers to reach a held-out loss on the demo task (not a test).

Four setups, one after another on this machine, two workers each, one torch thread per process, the demo task's
optimizer (AdamW, lr 2e-3) and batch (16 per worker and step):

- ``ddp``: two gloo DDP ranks, an all-reduce and an optimizer step every batch (global batch 32);
- ``sync``: the mesh in gradient mode (``--averaging gradients``) at ``--sync-target`` samples per epoch;
- ``diloco_H``: the mesh in DiLoCo mode with ``--inner-steps H`` for each H of ``--inner-steps`` (20, 100).

Eval loss: the mean next-byte loss on ``EVAL_WINDOWS`` fixed windows of standard-library modules that the demo's
corpus leaves out (it takes the top-level modules in name order up to its budget; these come after it): held out.
Every setup writes its parameters as it goes (DDP's rank 0 every ``SNAPSHOT_EVERY`` seconds; mesh peers a
checkpoint every epoch, copied aside by this script at most that often) and all are evaluated after the runs, so
the evaluation takes no CPU from training. Time counts from when training starts (both DDP ranks initialised;
both mesh peers training, past ``--min-peers``), so start-up is not in it.

Bytes: what one worker sent over TCP, from the kernel's per-socket counters (:mod:`mesh.wirebytes`): in DDP each
rank's process; in the mesh each peer's training process (the data plane; hivemind's DHT and matchmaking go
through its libp2p daemon and are not in it). Alongside, everything the loopback interface carried in the run
(``/proc/net/dev``: every process, headers included), halved: the whole cost of a worker, DHT and bootstrap
included. The target loss (``--target``) defaults to what DDP reaches after ``--target-at`` seconds (150).

    python -m tests.bench.diloco                                    # ddp, sync, diloco H=20 and H=100
    python -m tests.bench.diloco --seconds 120 --inner-steps 100 --json out.json

Run it on a quiet machine: every setup uses both cores, and the loopback count includes anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.optimizer import make_optimizer_factory
from mesh.tasks import charlm, load_task
from mesh.up import free_port
from mesh.wirebytes import TcpTraffic
from tests.procs import spawn

EVAL_WINDOWS = 256
SNAPSHOT_EVERY = 2.0  # seconds between saved parameters
BATCH = 16  # the demo task's per-step batch


def held_out_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """EVAL_WINDOWS windows of the standard-library modules that the demo's corpus does not take."""
    root = charlm.stdlib_dir()
    taken = set(charlm.corpus_files(root))
    rest = [path for path in sorted(root.glob("*.py")) if path not in taken]
    data = torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in rest)[:2_000_000]), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(999)
    starts = torch.randint(0, len(data) - charlm.BLOCK_SIZE - 1, (EVAL_WINDOWS, 1), generator=gen)
    chunk = data[starts + torch.arange(charlm.BLOCK_SIZE + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


def evaluate(snapshots: list[dict]) -> list[dict]:
    """Each snapshot ({"t", "path", ...}) with its held-out loss."""
    task, batch = load_task("demo"), held_out_batch()
    model = task.make_model()
    for snap in snapshots:
        state = torch.load(snap.pop("path"), map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state))
        with torch.no_grad():
            snap["loss"] = float(task.loss(model, batch))
    return snapshots


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])  # transmitted bytes (on lo, what is sent is what is received)
    return 0


# ---- DDP ----


def _ddp_rank(rank: int, port: int, seconds: float, snapdir: str, results) -> None:
    torch.set_num_threads(1)
    traffic = TcpTraffic()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        task = load_task("demo")
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(task.make_model())
        optimizer = make_optimizer_factory(task.defaults["optimizer"], task.defaults["lr"])(model.parameters())
        batches = task.make_batches(BATCH, rank + 1)
        dist.barrier()
        sent0, _ = traffic.update()
        started = time.monotonic()
        samples, next_snap, snaps = 0, 0.0, []
        while (now := time.monotonic() - started) < seconds:
            if rank == 0 and now >= next_snap:
                path = f"{snapdir}/{len(snaps)}.pt"
                torch.save(model.module.state_dict(), path)
                snaps.append({"t": now, "path": path, "samples": samples, "sent": traffic.update()[0] - sent0})
                next_snap = now + SNAPSHOT_EVERY
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, next(batches)).backward()  # the all-reduce of every step
            optimizer.step()
            samples += BATCH
        results[rank] = {"samples": samples, "sent": traffic.update()[0] - sent0, "snaps": snaps}
    finally:
        dist.destroy_process_group()


def run_ddp(seconds: float) -> dict:
    snapdir = tempfile.mkdtemp(prefix="bench-ddp-")
    results = mp.Manager().dict()
    lo = loopback_bytes()
    mp.spawn(_ddp_rank, args=(free_port(), seconds, snapdir, results), nprocs=2, join=True)
    lo = loopback_bytes() - lo
    out = {"samples": results[0]["samples"], "sent": results[0]["sent"], "loopback": lo / 2, "snaps": evaluate(results[0]["snaps"])}
    shutil.rmtree(snapdir, ignore_errors=True)
    return out


# ---- the mesh ----


def run_mesh(seconds: float, extra: tuple[str, ...]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-diloco-"))
    procs: list[subprocess.Popen] = []
    try:
        addr = workdir / "bootstrap.addr"
        procs.append(spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--address-file", str(addr)], workdir).proc)
        _wait(lambda: addr.exists(), 60, "a bootstrap address")
        join = addr.read_text().split()[0]
        for name in ("a", "b"):
            cli = ["peer", "--join", join, "--run", "bench", "--task", "demo", "--host", "127.0.0.1", "--threads", "1"]
            cli += ["--min-peers", "2", "--status-file", str(workdir / f"{name}.json"), "--checkpoint-dir", str(workdir / name)]
            cli += ["--checkpoint-every", "1", "--batch-size", str(BATCH), *extra]
            procs.append(spawn(name, cli, workdir).proc)
        status = workdir / "a.json"
        _wait(lambda: all(_status(workdir / f"{n}.json").get("state") == "training" for n in "ab"), 180, "both peers training")
        lo, started = loopback_bytes(), time.monotonic()
        base = _status(status)
        snaps: list[dict] = []
        last_mtime, checkpoint = 0.0, workdir / "a" / "checkpoint.pt"
        while (now := time.monotonic() - started) < seconds:
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a mesh process exited; logs in {workdir}")
            mtime = checkpoint.stat().st_mtime if checkpoint.exists() else 0.0
            if mtime != last_mtime and (not snaps or now - snaps[-1]["t"] >= SNAPSHOT_EVERY):
                last_mtime, path = mtime, workdir / f"snap-{len(snaps)}.pt"
                shutil.copyfile(checkpoint, path)
                s = _status(status)
                snaps.append(
                    {"t": now, "path": str(path), "samples": s.get("samples", 0) - base.get("samples", 0),
                     "sent": s.get("tcp_sent_bytes", 0) - base.get("tcp_sent_bytes", 0)}
                )  # fmt: skip
            time.sleep(0.2)
        end = _status(status)
        lo = loopback_bytes() - lo
        return {
            "samples": end.get("samples", 0) - base.get("samples", 0),
            "sent": end.get("tcp_sent_bytes", 0) - base.get("tcp_sent_bytes", 0),
            "loopback": lo / 2,
            "snaps": evaluate(snaps),
            "rounds": end.get("rounds"),
        }
    finally:
        for proc in procs:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


# ---- the report ----


def reached(snaps: list[dict], target: float) -> dict | None:
    """The first snapshot at or below the target loss."""
    return next((s for s in snaps if s["loss"] <= target), None)


def at_time(snaps: list[dict], t: float) -> dict | None:
    """The last snapshot at or before ``t`` seconds."""
    before = [s for s in snaps if s["t"] <= t]
    return before[-1] if before else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="training time per setup")
    parser.add_argument("--target-at", type=float, default=150.0, help="the target: DDP's loss after this many seconds")
    parser.add_argument("--target", type=float, default=None, help="the target held-out loss (instead of --target-at)")
    parser.add_argument("--sync-target", type=int, default=512, help="the sync mesh's epoch (samples over both peers)")
    parser.add_argument("--inner-steps", default="20,100", help="DiLoCo's H values, comma-separated")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--no-sync", action="store_true", help="leave out the sync mesh")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = {"ddp": run_ddp(args.seconds)}
    target = args.target if args.target is not None else at_time(runs["ddp"]["snaps"], args.target_at)["loss"]
    print(f"target held-out loss {target:.4f} (ddp after {args.target_at:g} s unless --target)", flush=True)
    if not args.no_sync:
        runs["sync"] = run_mesh(args.seconds, ("--averaging", "gradients", "--target-batch-size", str(args.sync_target)))
    outer = ("--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum))
    for h in [int(v) for v in args.inner_steps.split(",") if v]:
        runs[f"diloco_{h}"] = run_mesh(args.seconds, ("--averaging", "diloco", "--inner-steps", str(h), *outer))

    ddp_hit = reached(runs["ddp"]["snaps"], target)
    ddp_time = ddp_hit["t"] if ddp_hit else args.seconds
    ddp_per_sample = runs["ddp"]["sent"] / max(1, runs["ddp"]["samples"])
    print(f"{'setup':<11} {'to target s':>11} {'/ddp':>6} {'MB sent to target':>17} {'B/sample':>9} {'/ddp':>7} {'loopback B/sample':>17} "
          f"{'loss at ddp time':>16} {'final loss':>10} {'samples/s':>9}")  # fmt: skip
    report = {"target": target, "ddp_time_to_target": ddp_time, "setups": {}}
    for name, run in runs.items():
        hit, same_time = reached(run["snaps"], target), at_time(run["snaps"], ddp_time)
        per_sample = run["sent"] / max(1, run["samples"])
        row = {
            "time_to_target": hit["t"] if hit else None,
            "sent_to_target": hit["sent"] if hit else None,
            "bytes_per_sample": per_sample,
            "bytes_per_sample_vs_ddp": per_sample / ddp_per_sample,
            "loopback_bytes_per_sample": run["loopback"] / max(1, run["samples"]),
            "loss_at_ddp_time": same_time["loss"] if same_time else None,
            "final_loss": run["snaps"][-1]["loss"] if run["snaps"] else None,
            "samples_per_second_per_worker": run["samples"] / args.seconds,
            "curve": [(round(s["t"], 1), round(s["loss"], 4)) for s in run["snaps"]],
            "rounds": run.get("rounds"),
        }
        report["setups"][name] = row

        def fmt(value, spec: str) -> str:
            return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

        print(
            f"{name:<11} {fmt(row['time_to_target'], '11.1f')} {fmt(row['time_to_target'] and row['time_to_target'] / ddp_time, '6.2f')} "
            f"{fmt(row['sent_to_target'] and row['sent_to_target'] / 1e6, '17.2f')} {per_sample:9.1f} "
            f"{row['bytes_per_sample_vs_ddp']:7.4f} "
            f"{row['loopback_bytes_per_sample']:17.1f} {fmt(row['loss_at_ddp_time'], '16.4f')} {fmt(row['final_loss'], '10.4f')} "
            f"{row['samples_per_second_per_worker']:9.1f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
