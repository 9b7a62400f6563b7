"""All-reduce benchmark: the mesh's data plane against bare gloo and hivemind's own all-reduce (not a test).

What it measures: the time of one float32 all-reduce of a vector of ``--sizes`` elements (1M, 10M, 25M), in groups of
``--groups`` processes (2, 4) on 127.0.0.1, each process with one torch thread, three ways:

- ``gloo``: bare torch, ``ProcessGroupGloo.allreduce`` (SUM) of one tensor, on a device bound to 127.0.0.1 — the
  baseline;
- ``mesh``: the project's data plane (:mod:`mesh.dataplane`) as the averager uses it in a standing round: each
  process hosts a ``StoreHost``, the process group comes from ``GroupCache.get`` (its first build is timed too,
  reported as ``build``), and a round's work: :func:`exchange` of the members' rows (the arrival barrier and the
  weights: one small all-gather), :func:`load_scaled_` of the accumulated values into a :func:`flat_views` buffer
  with the member's share folded in (the one pass that replaces hivemind's copy-and-divide of the accumulators),
  then ``average_``'s chunked fp32 SUM of the buffer in place;
- ``hivemind``: hivemind's ``DecentralizedAverager`` (one ``hivemind.DHT`` per process, joined to the first), one
  ``step`` per repetition. Only the all-reduce is timed, not matchmaking: the step is started with
  ``require_trigger=True``; once every member reached ``AWAITING_TRIGGER`` the members pass a barrier, start the
  clock and call ``allow_allreduce()``, and stop it when ``result()`` returns.

Each (method, group) runs in fresh processes (forked: hivemind's DHT cannot be pickled for spawn) that go through all
sizes. Per size: one warm-up, which also checks the result against the closed-form sum or mean (member r holds
(r + 1) * the same random vector), then ``--repeats`` timed repetitions, each started together after a barrier. A
repetition's time is the slowest member's; the figure is the median over repetitions, and the bus bandwidth
busbw = 4 * elements / seconds * 2 (n - 1) / n (what each member's link carries in a ring all-reduce), in GB/s
(10^9 bytes). Ratios are of bus bandwidth: mesh/gloo is what the data plane costs over bare gloo (its exchange and
its load pass), hivemind/gloo what hivemind's own all-reduce would cost. Separate processes run one
after the other, so a shared machine's load can differ between them; hence ``mesh/gloo_paired`` as well: in the
mesh's processes every repetition first times a bare gloo all-reduce (SUM of one tensor) on the very process group
the data plane uses, then bare gloo's mean (the SUM, then a division by the group size, as DDP's default hook does),
then bare gloo after copying the accumulated values into its buffer, then the data plane, back to back;
``mesh/gloo_paired``, ``mesh/gloo_mean_paired`` and ``mesh/gloo_load_paired`` are the medians over repetitions of
the ratios of their times. ``mesh/clipped_paired`` is the same ratio for the data plane's round with
``--aggregation clipped`` (all-to-all, clipping per shard, all-gather) against its plain round: the clipped round's
time over the plain one's, so above 1 by what clipping costs.

    python -m tests.bench.allreduce                                  # 1M, 10M, 25M elements; groups of 2 and 4
    python -m tests.bench.allreduce --sizes 1M --groups 2 --repeats 2
    python -m tests.bench.allreduce --methods gloo,mesh --groups 4 --json allreduce.json

Run it on a quiet machine: with more processes than cores (a group of 4 on 2 cores) the figures measure the
scheduler as much as the all-reduce, and any other load skews them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from mesh.dataplane import Endpoint, GroupCache, StoreHost, average_, clipped_mean_, exchange, flat_views, load_scaled_

METHODS = ("gloo", "mesh", "hivemind")
PROBE = 4096  # leading elements compared against the closed-form result after the warm-up
STORE_TIMEOUT = 120.0  # seconds: TCPStore / process-group timeouts
BARRIER_TIMEOUT = 300.0  # seconds a member waits for the others at a barrier before giving up
CHECK_TOLERANCE = 1e-5  # relative error of the warm-up result above which a warning is printed


def parse_size(text: str) -> int:
    """``25M`` -> 25_000_000 (suffixes k, M, G are powers of 10); plain integers as they are."""
    text = text.strip()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower())
    value = float(text[:-1]) * scale if scale else float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of elements: {text!r}")
    return int(value)


def size_label(elements: int) -> str:
    for suffix, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if elements >= scale and elements % scale == 0:
            return f"{elements // scale}{suffix}"
    return str(elements)


def busbw(elements: int, group: int, seconds: float) -> float:
    """Bus bandwidth in GB/s of a float32 all-reduce of ``elements`` among ``group`` members in ``seconds``."""
    return 4 * elements / seconds * 2 * (group - 1) / group / 1e9


# ---- the member processes ----


def _vector(elements: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member ``rank``'s vector, (rank + 1) * a random vector common to all members, and that vector's first
    ``PROBE`` elements (to check the result against the closed form)."""
    base = torch.randn(elements, generator=torch.Generator().manual_seed(elements))
    probe = base[:PROBE].clone()
    return base.mul_(rank + 1), probe


def _check(result: torch.Tensor, probe: torch.Tensor, factor: float) -> float:
    """Relative error of the first elements of ``result`` against ``factor`` * the common vector."""
    expected = probe * factor
    return float((result[: probe.numel()] - expected).abs().max() / expected.abs().max())


def _timed(work, barrier, repeats: int, between=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``work``, each started after all members passed ``barrier``."""
    times = []
    for _ in range(repeats):
        barrier.wait(BARRIER_TIMEOUT)
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
        if between is not None:
            between()
    return times


def _exchange(shared, barrier, key: str, value) -> None:
    """Publish ``value`` under ``key`` and wait until every member has published its own."""
    shared[key] = value
    barrier.wait(BARRIER_TIMEOUT)


def _run_gloo(rank: int, world: int, sizes: list[int], repeats: int, shared, barrier, options: dict) -> dict:
    timeout = datetime.timedelta(seconds=STORE_TIMEOUT)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
        _exchange(shared, barrier, "gloo_port", store.port)
    else:
        barrier.wait(BARRIER_TIMEOUT)
        store = dist.TCPStore("127.0.0.1", shared["gloo_port"], world, is_master=False, timeout=timeout)
    gloo_options = dist.ProcessGroupGloo._Options()
    gloo_options._timeout = timeout
    gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    group = dist.ProcessGroupGloo(store, rank, world, gloo_options)
    out = {elements: _gloo_size(group, elements, rank, world, repeats, barrier) for elements in sizes}
    barrier.wait(BARRIER_TIMEOUT)  # nobody tears its process group down while another still uses it
    return out


def _gloo_size(group, elements: int, rank: int, world: int, repeats: int, barrier) -> dict:
    tensor, probe = _vector(elements, rank)
    barrier.wait(BARRIER_TIMEOUT)
    group.allreduce([tensor]).wait()  # warm-up
    error = _check(tensor, probe, world * (world + 1) / 2)
    tensor.div_(world)  # keep the values from growing by a factor of ``world`` per repetition
    times = _timed(lambda: group.allreduce([tensor]).wait(), barrier, repeats, between=lambda: tensor.div_(world))
    return {"times_s": times, "check_error": error}


def _run_mesh(rank: int, world: int, sizes: list[int], repeats: int, shared, barrier, options: dict) -> dict:
    host = StoreHost("127.0.0.1", STORE_TIMEOUT)
    me = f"bench-peer-{rank}".encode()
    _exchange(shared, barrier, f"mesh_{rank}", host.port)
    members = [(f"bench-peer-{r}".encode(), Endpoint("127.0.0.1", shared[f"mesh_{r}"], 0)) for r in range(world)]
    cache = GroupCache("127.0.0.1", STORE_TIMEOUT)
    started = time.perf_counter()
    group, _rank = cache.get(members, me, b"bench-round")
    build = time.perf_counter() - started
    group.allreduce([torch.zeros(1)]).wait()  # every member has its group before anyone goes on
    out = {}
    for elements in sizes:  # the same process group for every size, as in every round after a group's first
        out[elements] = {**_mesh_size(group, elements, rank, world, repeats, barrier), "build_s": build}
    barrier.wait(BARRIER_TIMEOUT)
    if cache.builds != 1:
        raise RuntimeError(f"GroupCache built {cache.builds} process groups for one membership")
    return out


# the mesh's paired baselines: (key in a member's figures, name in the ratios)
PAIRED = (
    ("paired_gloo_s", "gloo_paired"),
    ("paired_gloo_mean_s", "gloo_mean_paired"),
    ("paired_gloo_load_s", "gloo_load_paired"),
    ("paired_clipped_s", "clipped_paired"),  # the data plane's round with --aggregation clipped: above 1, its cost
)


def _mesh_size(group, elements: int, rank: int, world: int, repeats: int, barrier) -> dict:
    accumulated, probe = _vector(elements, rank)  # what the member's accumulators hold (never changed here)
    flat, views = flat_views([accumulated])
    bare = accumulated.clone()  # the same values, for the paired bare all-reduces on the same process group

    def work() -> None:  # a standing round: the rows (arrival barrier, weights), the share folded into the load, SUM
        rows = exchange(group, [1.0, 0.0, 0.0, 0.0, float(world), 0.0, 0.0])
        load_scaled_(views, [accumulated], 1.0 / sum(row[0] for row in rows))
        average_(group, views, flat, share=1.0, compression="none")

    def clipped() -> None:  # the same round with --aggregation clipped: all-to-all, clip per shard, all-gather
        rows = exchange(group, [1.0, 0.0, 0.0, 0.0, float(world), 0.0, 0.0])
        load_scaled_(views, [accumulated], 1.0 / sum(row[0] for row in rows))
        clipped_mean_(group, flat, [row[0] / sum(r[0] for r in rows) for row in rows])

    barrier.wait(BARRIER_TIMEOUT)
    work()  # warm-up
    error = _check(flat, probe, (world + 1) / 2)
    # paired: each repetition times bare gloo (SUM of one tensor on this very process group), bare gloo's mean (the
    # SUM, then a division, as DDP's default hook averages), bare gloo after a copy of the accumulated values into
    # its buffer (the least any average of accumulated gradients into a separate buffer does), then the data plane,
    # back to back, so that all of them see the same moment of a shared machine
    times, paired, paired_mean, paired_load, paired_clipped = [], [], [], [], []
    for _ in range(repeats):
        paired_clipped += _timed(clipped, barrier, 1)
        paired += _timed(lambda: group.allreduce([bare]).wait(), barrier, 1, between=lambda: bare.div_(world))
        paired_mean += _timed(lambda: (group.allreduce([bare]).wait(), bare.div_(world)), barrier, 1)
        paired_load += _timed(lambda: (bare.copy_(accumulated), group.allreduce([bare]).wait()), barrier, 1)
        times += _timed(work, barrier, 1)
    return {
        "times_s": times,
        "paired_gloo_s": paired,
        "paired_gloo_mean_s": paired_mean,
        "paired_gloo_load_s": paired_load,
        "paired_clipped_s": paired_clipped,
        "check_error": error,
    }


def _run_hivemind(rank: int, world: int, sizes: list[int], repeats: int, shared, barrier, options: dict) -> dict:
    import hivemind
    from hivemind.averaging.control import AveragingStage

    matchmaking = options["matchmaking_time"]
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        _exchange(shared, barrier, "hivemind_maddrs", [str(addr) for addr in dht.get_visible_maddrs()])
    else:
        barrier.wait(BARRIER_TIMEOUT)
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=shared["hivemind_maddrs"])
    averager = None
    try:
        out = {}
        for elements in sizes:
            tensor, probe = _vector(elements, rank)
            averager = hivemind.averaging.DecentralizedAverager(
                [tensor],
                dht=dht,
                prefix=f"allreduce_bench_{world}_{elements}",
                target_group_size=world,
                min_matchmaking_time=matchmaking,
                request_timeout=1.0,
                start=True,
            )
            del tensor

            def one_step() -> float:
                barrier.wait(BARRIER_TIMEOUT)  # everyone looks for the group at the same time
                control = averager.step(wait=False, require_trigger=True, allow_retries=False, timeout=4 * matchmaking + 30)
                deadline = time.monotonic() + 4 * matchmaking + 60
                while control.stage != AveragingStage.AWAITING_TRIGGER:
                    if control.done():
                        control.result()  # raises what failed
                        raise RuntimeError(f"step finished before the trigger, in stage {control.stage}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no group within {4 * matchmaking + 60:.0f} s (stage {control.stage})")
                    time.sleep(0.002)
                barrier.wait(BARRIER_TIMEOUT)  # every member is in its group: start the all-reduce together
                started = time.perf_counter()
                control.allow_allreduce()
                gathered = control.result(BARRIER_TIMEOUT)
                seconds = time.perf_counter() - started
                if gathered is None or len(gathered) != world:
                    raise RuntimeError(
                        f"averaged in a group of {0 if gathered is None else len(gathered)}, not {world}: raise --matchmaking-time"
                    )
                return seconds

            one_step()  # warm-up
            with averager.get_tensors() as averaged:
                error = _check(averaged[0], probe, (world + 1) / 2)
            times = [one_step() for _ in range(repeats)]
            out[elements] = {"times_s": times, "check_error": error}
            barrier.wait(BARRIER_TIMEOUT)  # the last round is over on every member
            averager.shutdown()
            averager = None
        return out
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


RUNNERS = {"gloo": _run_gloo, "mesh": _run_mesh, "hivemind": _run_hivemind}


def _member(method: str, rank: int, world: int, sizes: list[int], repeats: int, shared, barrier, results, options) -> None:
    os.setsid()  # its own process group: the parent reaps hivemind's DHT / averager / p2pd children with it
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", RUNNERS[method](rank, world, sizes, repeats, shared, barrier, options)))
    except BaseException:  # reported to the parent, which fails the method
        barrier.abort()  # the others stop waiting for this member
        results.put((rank, "error", traceback.format_exc()))
        sys.exit(1)


def _deadline(method: str, world: int, sizes: list[int], repeats: int, matchmaking: float) -> float:
    """Seconds a (method, group) may take in all: generous, it only bounds a hung run."""
    per_element = 2e-7 if method != "hivemind" else 2e-6
    steps = (repeats + 1) * len(sizes)
    matchmaking_total = steps * (matchmaking + 5) if method == "hivemind" else 0
    return 120 + per_element * world * sum(sizes) * (repeats + 1) + matchmaking_total


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _reap(procs: list, grace: float) -> None:
    """Join the members; whatever is left of them or of their process groups (a DHT, an averager, a p2pd) after
    ``grace`` seconds is terminated, then killed."""
    grace = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.1, grace - time.monotonic()))
    pgids = [proc.pid for proc in procs if proc.pid is not None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pgid for pgid in pgids if _group_alive(pgid)]
        if not left:
            break
        for pgid in left:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            proc.join(5)
        wait_until = time.monotonic() + 5
        while time.monotonic() < wait_until and any(_group_alive(pgid) for pgid in left):
            time.sleep(0.1)


def run_method(method: str, world: int, sizes: list[int], repeats: int, options: dict) -> dict[int, dict]:
    """One (method, group): ``world`` forked members over all sizes. Per size: median seconds, bus bandwidth, the
    slowest member's time per repetition, the warm-up's check error (the worst member's) and, for the mesh, the
    first ``GroupCache.get`` (the slowest member's)."""
    ctx = mp.get_context("fork")
    manager = ctx.Manager()
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs: list = []
    finished = False
    limit = _deadline(method, world, sizes, repeats, options["matchmaking_time"])
    try:
        shared = manager.dict()
        procs = [
            ctx.Process(
                target=_member, args=(method, rank, world, sizes, repeats, shared, barrier, results, options), name=f"{method}-{rank}"
            )
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + limit
        collected: dict[int, dict] = {}
        while len(collected) < world:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode is not None and p.exitcode != 0]
                if dead:
                    raise RuntimeError(f"{method} x{world}: {', '.join(dead)} exited without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{method} x{world}: no result within {limit:.0f} s")
                continue
            if status != "ok":
                raise RuntimeError(f"{method} x{world}, member {rank} failed:\n{payload}")
            collected[rank] = payload
        finished = True
    finally:
        barrier.abort()  # a member still waiting at a barrier gives up
        _reap(procs, grace=30 if finished else 5)  # members that are done may still be shutting hivemind down
        manager.shutdown()
    out = {}
    for elements in sizes:
        per_member = [collected[rank][elements] for rank in range(world)]
        times = [max(member["times_s"][i] for member in per_member) for i in range(repeats)]
        median = statistics.median(times)
        out[elements] = {
            "median_s": median,
            "busbw_gbps": busbw(elements, world, median),
            "times_s": times,
            "check_error": max(member["check_error"] for member in per_member),
        }
        if "build_s" in per_member[0]:
            out[elements]["build_s"] = max(member["build_s"] for member in per_member)
        for key, name in PAIRED:
            if key in per_member[0]:
                paired = [max(member[key][i] for member in per_member) for i in range(repeats)]
                # median over repetitions of (baseline time / data-plane time): the data plane's share of its busbw
                out[elements][f"mesh/{name}"] = statistics.median(g / m for g, m in zip(paired, times))
                out[elements][f"{name}_median_s"] = statistics.median(paired)
    return out


def _cell(figures: dict | None) -> str:
    if figures is None:
        return "failed"
    return f"{figures['median_s'] * 1e3:8.1f} ms {figures['busbw_gbps']:6.2f} GB/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,25M", help="float32 elements per vector, comma-separated (1M = 10^6)")
    parser.add_argument("--groups", default="2,4", help="group sizes (processes), comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--matchmaking-time", type=float, default=3.0, help="hivemind's min_matchmaking_time (s)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    chosen = {m.strip() for m in args.methods.split(",") if m.strip()}
    if unknown := sorted(chosen - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    methods = [m for m in METHODS if m in chosen]  # gloo first: the baseline
    if any(g < 2 for g in groups) or args.repeats < 1 or not sizes:
        parser.error("groups need at least 2 members, --repeats at least 1, and --sizes one size")
    options = {"matchmaking_time": args.matchmaking_time}

    results: dict[tuple[str, int], dict[int, dict] | None] = {}
    errors: dict[str, str] = {}
    for world in groups:
        for method in methods:
            print(f"... {method} x{world}", file=sys.stderr, flush=True)
            try:
                results[method, world] = run_method(method, world, sizes, args.repeats, options)
            except Exception as err:  # one failed method does not cost the others' figures
                results[method, world] = None
                errors[f"{method}_x{world}"] = str(err)
                print(f"{method} x{world} failed: {err}", file=sys.stderr, flush=True)

    print(f"float32 all-reduce, 127.0.0.1, 1 thread per process, median of {args.repeats} (after 1 warm-up); busbw GB/s")
    rows = []
    for elements in sizes:
        for world in groups:
            figures = {m: (results[m, world] or {}).get(elements) for m in methods}
            ratios = {}
            if figures.get("gloo"):
                for other in ("mesh", "hivemind"):
                    if figures.get(other):
                        ratios[f"{other}/gloo"] = figures[other]["busbw_gbps"] / figures["gloo"]["busbw_gbps"]
            cells = [f"{m} {_cell(figures[m])}" for m in methods]
            if figures.get("mesh") and "build_s" in figures["mesh"]:
                cells.append(f"mesh build {figures['mesh']['build_s'] * 1e3:.0f} ms")
            for _key, name in PAIRED:
                if figures.get("mesh") and f"mesh/{name}" in figures["mesh"]:
                    ratios[f"mesh/{name}"] = figures["mesh"][f"mesh/{name}"]
            line = f"{size_label(elements):>4} x{world}: " + " | ".join(cells)
            if ratios:
                line += " | " + " ".join(f"{name}={value:.2f}" for name, value in ratios.items())
            print(line)
            for m, f in figures.items():
                if f and f["check_error"] > CHECK_TOLERANCE:
                    print(f"  WARNING: {m} x{world} {size_label(elements)}: warm-up result off by {f['check_error']:.2e} (relative)")
            rows.append({"elements": elements, "group": world, "figures": figures, "ratios": ratios})
    for name, err in errors.items():
        lines = err.strip().splitlines() or [""]
        print(f"  {name} failed: {lines[0]}" + (f" ... {lines[-1].strip()}" if len(lines) > 1 else ""))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows, "errors": errors}, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
