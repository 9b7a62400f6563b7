"""What the data plane's load pass costs, and whether overlapping it with the wire hides it (not a test).

A gradient round cannot all-reduce the accumulators themselves: a collective that fails midway leaves its buffer
half-reduced, and hivemind then steps with the local gradient, reloaded from the accumulators. So every round first
loads the accumulated gradients, times the member's share of the mean, into the averaging buffer (one pass, 4 bytes
read and 4 written per element: :func:`mesh.dataplane.load_scaled_`), then SUMs the buffer. Against a bare SUM of a
buffer that already holds the values, that pass is the data plane's cost. Timed here, paired (each repetition runs
every variant back to back after a barrier, on one gloo process group; the ratio is the median over repetitions of
bare's time over the variant's):

- ``bare``: the SUM alone (the issue's baseline);
- ``load+sum``: the load pass over the whole buffer, then one SUM (what a standing round does);
- ``overlap/N``: the buffer cut into chunks of N elements; each chunk is loaded, then its SUM started without
  waiting, so the next chunk's load runs while the previous one is on the wire (gloo's own thread).

    python -m tests.bench.load_overlap                  # 25M float32, groups of 2, 9 repetitions
    python -m tests.bench.load_overlap --elements 10M --world 4 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import statistics
import time

import torch
import torch.distributed as dist

from mesh.dataplane import load_scaled_
from tests.bench.allreduce import parse_size

CHUNKS = (2**20, 2**22, 2**23)  # 4, 16 (the data plane's CHUNK_ELEMENTS), 32 MB of float32


def _member(rank: int, world: int, ports, elements: int, repeats: int, results) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
        for _ in range(world - 1):
            ports.put(store.port)
    else:
        store = dist.TCPStore("127.0.0.1", ports.get(timeout=60), world, is_master=False, timeout=timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    group = dist.ProcessGroupGloo(store, rank, world, options)
    accumulated = torch.randn(elements, generator=torch.Generator().manual_seed(rank))
    flat, bare = torch.empty(elements), accumulated.clone()
    share = 1.0 / world

    def load_sum() -> None:
        load_scaled_([flat], [accumulated], share)
        group.allreduce([flat]).wait()

    def overlap(chunk: int):
        def work() -> None:
            works = []
            for start in range(0, elements, chunk):
                part = flat[start : start + chunk]
                load_scaled_([part], [accumulated[start : start + chunk]], share)
                works.append(group.allreduce([part]))
            for handle in works:
                handle.wait()

        return work

    variants = {"bare": lambda: group.allreduce([bare]).wait(), "load+sum": load_sum}
    variants.update({f"overlap/{chunk}": overlap(chunk) for chunk in CHUNKS})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for name, work in variants.items():
            group.allreduce([torch.zeros(1)]).wait()  # a barrier
            started = time.perf_counter()
            work()
            if repeat:
                times[name].append(time.perf_counter() - started)
        bare.copy_(accumulated)  # keep the values from growing
    if rank == 0:
        results.put(times)
    group.allreduce([torch.zeros(1)]).wait()  # nobody tears its group down while another still uses it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=parse_size, default=parse_size("25M"))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    ports: mp.Queue = mp.Queue()
    results: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_member, args=(r, args.world, ports, args.elements, args.repeats, results)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    times = results.get(timeout=600)
    for proc in procs:
        proc.join(60)
    print(f"{args.elements} float32, groups of {args.world}, 1 thread per process, median of {args.repeats}")
    for name, values in times.items():
        paired = statistics.median(b / v for b, v in zip(times["bare"], values))
        print(f"  {name:18s} {statistics.median(values) * 1e3:8.1f} ms   bare/this paired {paired:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
