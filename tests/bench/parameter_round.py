"""What an exact parameter round costs (not a test).

A parameter round (hivemind's state averager) runs on float64 copies of the state, so that its members end it
bit-identical (``ExactRoundMixin`` in mesh/averager.py); ``--averaging local`` keeps float32 rounds. Two pairs of
the run's real optimizers (``make_run_optimizer``: SGD over one Linear layer of about ``--elements`` parameters) on
one DHT on 127.0.0.1: one pair with exact rounds, the other with float32 rounds (the same code with the flag off).
Each repetition gives both pairs the same two random states (N(0, 1e-3), a different draw each time) and times one
parameter round of each pair, back to back. Printed: the median round of each, their ratio, and on how many values
the two members ended apart.

    python -m tests.bench.parameter_round                   # 25M parameters, 5 repetitions
    python -m tests.bench.parameter_round --elements 1M --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import warnings
from unittest import mock

import hivemind
import torch

import mesh.optimizer
from mesh.optimizer import MeshOptimizer
from tests.bench.allreduce import parse_size
from tests.integration.optimizer_peers import sgd_record, start_peer

IN_FEATURES = 1000


class Float32Rounds(MeshOptimizer):
    """The run's optimizer with float32 parameter rounds (those of --averaging local), and all else alike."""

    def _make_state_averager(self, **kwargs):
        self.exact_state_rounds = False
        return super()._make_state_averager(**kwargs)


def pair(run: str, elements: int, initial_peers: list, exact: bool) -> list[tuple[hivemind.DHT, MeshOptimizer]]:
    record = sgd_record(run, averaging="gradients", matchmaking_time=1.0, averaging_timeout=60.0)
    peers = []
    for _ in range(2):
        model = torch.nn.Linear(IN_FEATURES, max(1, elements // IN_FEATURES))
        with mock.patch.object(mesh.optimizer, "MeshOptimizer", MeshOptimizer if exact else Float32Rounds):
            dht, opt = start_peer(record, initial_peers, model)
        peers.append((dht, opt))
        initial_peers = initial_peers or dht.get_visible_maddrs()
    return peers


def parameter_round(opts: list[MeshOptimizer], states: list[list[torch.Tensor]]) -> tuple[float, int]:
    """Seconds for one parameter round of ``opts`` from ``states``, and the values on which they ended apart."""
    for opt, state in zip(opts, states):
        opt.set_optimized_parameters(state)
        opt.state_averager.set_target_group_size(len(opts))
    threads = [
        threading.Thread(target=opt.state_averager.step, kwargs={"averaging_round": True, "averaging_opts": {"timeout": 60}})
        for opt in opts
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    first, second = ([p.detach() for p in opt.optimized_parameters] for opt in opts)
    return seconds, sum(int((x != y).sum()) for x, y in zip(first, second))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=parse_size, default=parse_size("25M"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    exact = pair("exact-rounds", args.elements, [], exact=True)
    float32 = pair("float32-rounds", args.elements, exact[0][0].get_visible_maddrs(), exact=False)
    shapes = [p.shape for p in exact[0][1].optimized_parameters]
    print(f"parameter rounds of 2 members, {sum(s.numel() for s in shapes):,} float32 parameters, {args.repeats} repetitions", flush=True)
    times: dict[str, list[float]] = {"exact": [], "float32": []}
    apart: dict[str, list[int]] = {"exact": [], "float32": []}
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(args.repeats):
            states = [[torch.randn(shape, generator=generator) * 1e-3 for shape in shapes] for _ in range(2)]
            for name, peers in (("exact", exact), ("float32", float32)):
                seconds, unequal = parameter_round([opt for _, opt in peers], states)
                times[name].append(seconds)
                apart[name].append(unequal)
        for name in times:
            print(f"{name:<8} median {statistics.median(times[name]):.3f} s  values apart after the round: {apart[name]}")
        print(f"exact / float32: {statistics.median(times['exact']) / statistics.median(times['float32']):.2f}")
    finally:
        for dht, opt in (*exact, *float32):
            opt.shutdown()
            dht.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
