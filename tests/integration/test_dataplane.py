"""The data plane (torch's gloo process groups inside hivemind's matched groups), against closed-form references.

Real hivemind DHTs and averagers on 127.0.0.1 (each averager runs in its own process, as in a peer). References:
the weighted mean of the members' gradients (weights = samples accumulated, as hivemind weighs them); a round that
loses a member mid-all-reduce must fail within its timeout and leave the survivors able to average again; a group
whose membership changed must average over exactly its new members.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack

import hivemind
import pytest
import torch
from hivemind.averaging.control import AveragingStage
from torch.testing import assert_close

from mesh.averager import MeshGradientAverager
from mesh.trainer import EIGHT_BIT_MIN_SIZE, make_compression

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s

SIZES = (EIGHT_BIT_MIN_SIZE * 4, 17)  # one tensor 8-bit really quantizes, one it sends as fp16
ATOL = {"none": 1e-6, "fp16": 4e-3}  # fp16: ~11 significant bits on values |x| < 5; 8-bit: see test_compression.py


class Member:
    """One averaging member: a DHT, parameters whose gradients are known, and a MeshGradientAverager."""

    def __init__(self, index: int, stack: ExitStack, initial_peers: list, compression: str = "none", timeout: float = 10.0) -> None:
        self.dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
        stack.callback(self.dht.shutdown)
        self.params = [torch.nn.Parameter(torch.zeros(n)) for n in SIZES]
        self.averager = MeshGradientAverager(
            self.params,
            dht=self.dht,
            prefix="dataplane",
            run_id="dataplane",
            compression_name=compression,
            compression=make_compression(compression),
            data_plane_host="127.0.0.1",
            start=True,
            min_matchmaking_time=3.0,
            request_timeout=1.0,
            allreduce_timeout=timeout,
        )
        stack.callback(self.averager.shutdown)
        self.seed = 100 * index

    def gradients(self, round_: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + round_)
        return [torch.randn(n, generator=gen) for n in SIZES]

    def start_round(self, round_: int, group_size: int, samples: int):
        """Accumulate this round's gradients (``samples`` = the weight) and begin averaging; returns the control."""
        for param, grad in zip(self.params, self.gradients(round_)):
            param.grad = grad.clone()
        self.averager.accumulate_grads_(batch_size=samples)
        self.averager.set_target_group_size(group_size)
        return self.averager.step(wait=False, timeout=30)

    def averaged(self) -> list[torch.Tensor]:
        with self.averager.get_tensors() as tensors:
            return [t.clone() for t in tensors]


def start_members(count: int, stack: ExitStack, **kwargs) -> list[Member]:
    first = Member(0, stack, [], **kwargs)
    return [first] + [Member(i, stack, first.dht.get_visible_maddrs(), **kwargs) for i in range(1, count)]


def weighted_mean(members: list[Member], round_: int, weights: list[int]) -> list[torch.Tensor]:
    total = sum(weights)
    grads = [m.gradients(round_) for m in members]
    return [sum(w * g[i] for w, g in zip(weights, grads)) / total for i in range(len(SIZES))]


def run_round(members: list[Member], round_: int, weights: list[int]) -> list:
    controls = [m.start_round(round_, len(members), w) for m, w in zip(members, weights)]
    return [control.result(60) for control in controls]


def assert_mean(got: list[torch.Tensor], want: list[torch.Tensor], compression: str) -> None:
    for g, w in zip(got, want):
        if compression == "8bit" and g.numel() >= EIGHT_BIT_MIN_SIZE:
            error = (g - w).abs()
            assert error.mean() < 0.02, error.mean()
            assert (error > 0.06).float().mean() < 0.01
        else:
            assert_close(g, w, rtol=0, atol=ATOL.get(compression, 4e-3))


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("compression", ["none", "fp16", "8bit"])
def test_average_is_the_weighted_mean(compression: str, group: int) -> None:
    with ExitStack() as stack:
        members = start_members(group, stack, compression=compression)
        weights = [16 * (i + 1) for i in range(group)]
        for round_ in (1, 2):  # the second round reuses the first one's process group
            gathered = run_round(members, round_, weights)
            assert all(len(g) == group for g in gathered), gathered
            want = weighted_mean(members, round_, weights)
            results = [m.averaged() for m in members]
            for result in results:
                assert_mean(result, want, compression)
            for other in results[1:]:  # every member holds the same numbers, bit for bit
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b)
        assert [m.averager.data_plane_builds for m in members] == [1] * group  # built once, then cached
        assert [m.averager.data_plane_fallbacks for m in members] == [0] * group  # never hivemind's all-reduce


def test_member_killed_mid_allreduce_fails_the_round_within_the_timeout_then_survivors_average() -> None:
    timeout = 8.0
    with ExitStack() as stack:
        members = start_members(3, stack, timeout=timeout)
        run_round(members, 1, [1, 1, 1])  # builds and caches the three-member process group
        survivors, victim = members[:2], members[2]
        # the survivors enter the collective; the victim joins the group but never the collective, then dies
        victim.averager.set_target_group_size(3)
        victim_control = victim.averager.schedule_step(timeout=30)
        controls = [m.start_round(2, 3, 1) for m in survivors]
        deadline = time.monotonic() + 20
        while not all(c.stage == AveragingStage.RUNNING_ALLREDUCE for c in controls):
            assert time.monotonic() < deadline, [c.stage for c in controls]
            time.sleep(0.01)
        time.sleep(0.5)  # the survivors are now blocked in the collective, waiting for the victim
        assert not any(c.done() for c in controls) and victim_control.stage == AveragingStage.AWAITING_TRIGGER
        os.kill(victim.averager.pid, signal.SIGKILL)
        killed = time.monotonic()
        for control in controls:
            with pytest.raises(Exception):
                control.result(timeout + 5)
        assert time.monotonic() - killed < timeout + 2  # failed within the averaging timeout, no hang
        for member in survivors:
            member.averager.notify_used_averaged_gradients()  # what hivemind.Optimizer does after a round
            assert member.averager.last_outcome == "failed"
            assert member.averager.wants_state_averaging  # the group will average parameters next
            member.averager.reset_accumulated_grads_()

        gathered = run_round(survivors, 3, [1, 2])  # the next round rebuilds a process group of two
        assert all(len(g) == 2 for g in gathered)
        want = weighted_mean(survivors, 3, [1, 2])
        for member in survivors:
            assert_mean(member.averaged(), want, "none")
            assert member.averager.data_plane_builds == 2


def test_membership_change_rebuilds_the_group_and_averages_over_the_new_members() -> None:
    with ExitStack() as stack:
        pair = start_members(2, stack)
        run_round(pair, 1, [1, 1])
        joiner = Member(2, stack, pair[0].dht.get_visible_maddrs())
        trio = [*pair, joiner]
        gathered = run_round(trio, 2, [1, 1, 1])
        assert all(len(g) == 3 for g in gathered)
        for member in trio:
            assert_mean(member.averaged(), weighted_mean(trio, 2, [1, 1, 1]), "none")
        joiner.averager.shutdown()  # leaves
        gathered = run_round(pair, 3, [3, 1])
        assert all(len(g) == 2 for g in gathered)
        for member in pair:
            assert_mean(member.averaged(), weighted_mean(pair, 3, [3, 1]), "none")
            assert member.averager.data_plane_builds == 3  # pair, trio, pair again: each membership its own group
