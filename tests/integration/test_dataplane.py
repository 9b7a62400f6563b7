"""The data plane (torch's gloo process groups inside hivemind's matched groups, and standing groups that skip
matchmaking), against closed-form references.

Real hivemind DHTs and averagers on 127.0.0.1 (each averager's matchmaking runs in its own process, as in a peer;
the collectives run in the member's process). References: the weighted mean of the members' gradients (weights =
samples accumulated, as hivemind weighs them); a round that loses a member (a separate process, SIGKILLed)
mid-all-reduce must fail within its timeout and leave the survivors able to average again; a group whose
membership changed must average over exactly its new members.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from contextlib import ExitStack

import hivemind
import psutil
import pytest
import torch
from hivemind.averaging.control import AveragingStage
from torch.testing import assert_close

from mesh.averager import MeshGradientAverager
from mesh.optimizer import EIGHT_BIT_MIN_SIZE, make_compression
from mesh.planeround import PlaneRound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s

SIZES = (EIGHT_BIT_MIN_SIZE * 4, 17)  # one tensor 8-bit really quantizes, one it sends as fp16
ATOL = {"none": 1e-6, "fp16": 4e-3}  # fp16: ~11 significant bits on values |x| < 5; 8-bit: see test_compression.py


class Member:
    """One averaging member: a DHT, parameters whose gradients are known, and a MeshGradientAverager."""

    def __init__(
        self,
        index: int,
        stack: ExitStack,
        initial_peers: list,
        compression: str = "none",
        timeout: float = 10.0,
        epochs: bool = False,
        aggregation: str = "mean",
        data_plane: bool = True,
    ) -> None:
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
            data_plane_host="127.0.0.1" if data_plane else None,
            start=True,
            min_matchmaking_time=3.0,
            request_timeout=1.0,
            allreduce_timeout=timeout,
            aggregation=aggregation,
        )
        stack.callback(self.averager.shutdown)
        self.seed = 100 * index
        self.scale = 1.0  # a faulty member's gradients are this many times too large
        self.round = 0
        self.behind = 0  # epochs this member's published epoch lags its rounds (a late joiner catching up)
        if epochs:  # what a trainer publishes: with them, a settled group's next round skips matchmaking
            self.averager.local_epoch = lambda: self.round - self.behind
            self.averager.local_rate = lambda: 100.0

    def gradients(self, round_: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + round_)
        return [self.scale * torch.randn(n, generator=gen) for n in SIZES]

    def start_round(self, round_: int, group_size: int, samples: int):
        """Accumulate this round's gradients (``samples`` = the weight) and begin averaging; returns the control."""
        self.round = round_
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


def finish_round(members: list[Member], controls: list) -> list:
    """Each member's round result, then what hivemind.Optimizer does after a round."""
    gathered = [control.result(60) for control in controls]
    for member in members:
        member.averager.notify_used_averaged_gradients()
        member.averager.reset_accumulated_grads_()
    return gathered


def run_round(members: list[Member], round_: int, weights: list[int], live: int | None = None) -> list:
    return finish_round(members, [m.start_round(round_, live or len(members), w) for m, w in zip(members, weights)])


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
        members = start_members(group, stack, compression=compression, epochs=True)
        weights = [16 * (i + 1) for i in range(group)]
        # the second round reuses the first one's process group; the group is then settled, so the third stands
        # (no matchmaking, and the share folded into the load of the accumulators)
        for round_ in (1, 2, 3):
            gathered = run_round(members, round_, weights)
            assert all(len(g) == group for g in gathered), gathered
            want = weighted_mean(members, round_, weights)
            results = [m.averaged() for m in members]
            for result in results:
                assert_mean(result, want, compression)
            for other in results[1:]:  # every member holds the same numbers, bit for bit
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b)
        assert [m.averager.standing_rounds for m in members] == [1] * group
        assert [m.averager.data_plane_builds for m in members] == [1] * group  # built once, then cached
        assert [m.averager.data_plane_fallbacks for m in members] == [0] * group  # never hivemind's all-reduce


def clipped_mean(members: list[Member], round_: int, weights: list[int]) -> torch.Tensor:
    """By hand: the flat buffer cut into one shard per member; in each shard every member's part is scaled down to
    the lower median of the parts' norms, then the weighted mean is taken (mesh.dataplane.clipped_mean_)."""
    flats = [torch.cat(m.gradients(round_)) for m in members]
    shard = -(-flats[0].numel() // len(members))
    out = []
    for start in range(0, flats[0].numel(), shard):
        parts = [f[start : start + shard] for f in flats]
        norms = sorted(float(p.norm()) for p in parts)
        bound = norms[(len(norms) - 1) // 2]
        scaled = [p * min(1.0, bound / float(p.norm())) for p in parts]
        out.append(sum(w * p for w, p in zip(weights, scaled)) / sum(weights))
    return torch.cat(out)


def test_clipped_aggregation_bounds_a_faulty_member_and_is_the_clipped_mean() -> None:
    with ExitStack() as stack:
        members = start_members(3, stack, epochs=True, aggregation="clipped")
        members[2].scale = 1e4
        weights = [16, 32, 48]
        for round_ in (1, 2, 3):  # matched, reused, then standing (the share folded into the load)
            run_round(members, round_, weights)
            want = clipped_mean(members, round_, weights)
            for member in members:
                assert_close(torch.cat(member.averaged()), want, rtol=1e-5, atol=1e-5)
            # bounded: the faulty member's x1e4 moves the mean by less than the honest members' own norm
            honest = torch.cat(weighted_mean(members[:2], round_, weights[:2]))
            assert float((want - honest).norm()) < 2 * float(honest.norm())
            assert float(torch.cat(weighted_mean(members, round_, weights)).norm()) > 1e3 * float(honest.norm())  # unclipped
        # each member owns one shard, where the faulty member's part is the one outlier, every round
        assert [m.averager.clipped_outliers for m in members] == [3, 3, 3]
        assert [m.averager.standing_rounds for m in members] == [1] * 3


def test_a_clipped_group_whose_build_failed_builds_again_at_its_next_round() -> None:
    """A process group that could not be built (here: the rendezvous host was advertised on an address nobody listens
    on, then fixed) fails its round; under --aggregation clipped the next round builds again and is the clipped mean
    (hivemind's all-reduce, the 10-round fallback of plain mean, has no clipping: those rounds failed too)."""
    with ExitStack() as stack:
        members = start_members(2, stack, epochs=True, aggregation="clipped", timeout=4.0)  # the failed build's wait
        weights = [16, 32]
        for member in members:
            member.averager.data_plane_host = "127.0.0.2"  # advertised in the round's endpoint; the store is on .1
        controls = [m.start_round(1, 2, w) for m, w in zip(members, weights)]
        for control in controls:
            with pytest.raises(Exception, match="process group not built"):
                control.result(60)
        finish_round(members, [])
        for member in members:
            member.averager.data_plane_host = "127.0.0.1"
        assert [m.averager.data_plane_fallbacks for m in members] == [1, 1]
        run_round(members, 2, weights)
        for member in members:
            assert_close(torch.cat(member.averaged()), clipped_mean(members, 2, weights), rtol=1e-5, atol=1e-5)
        assert [m.averager.data_plane_builds for m in members] == [1, 1]


@pytest.mark.parametrize("data_plane", [True, False], ids=["gloo", "hivemind"])
def test_a_member_behind_the_groups_epoch_is_left_out_of_the_mean(data_plane: bool) -> None:
    """A member whose epoch lags the group's computed its gradient on parameters an epoch or more old: the round's
    mean is the others' alone (every member, itself included, gets it), and it counts the round. On the data plane
    and on hivemind's all-reduce (a group where some member offers no data plane)."""
    with ExitStack() as stack:
        members = start_members(3, stack, epochs=True, data_plane=data_plane)
        weights = [16, 32, 48]
        run_round(members, 1, weights)
        for member in members:
            assert_mean(member.averaged(), weighted_mean(members, 1, weights), "none")
        members[2].behind = 2
        run_round(members, 2, weights)
        for member in members:
            assert_mean(member.averaged(), weighted_mean(members[:2], 2, weights[:2]), "none")
        assert [m.averager.behind_rounds for m in members] == [0, 0, 1]
        members[2].behind = 0  # caught up (a peer takes the newest state): counted in the mean again
        run_round(members, 3, weights)
        for member in members:
            assert_mean(member.averaged(), weighted_mean(members, 3, weights), "none")
        assert [m.averager.behind_rounds for m in members] == [0, 0, 1]


@pytest.mark.parametrize("data_plane", [True, False], ids=["gloo", "hivemind"])
def test_a_member_behind_with_only_a_weightless_member_ahead_keeps_its_own_gradient(data_plane: bool) -> None:
    """The member ahead tags along with weight 0 (as hivemind does while it downloads state): leaving the member
    behind out as well would leave no weight at all (hivemind's mean would be 0/0, NaN for both); its own gradient
    is then the round's mean."""
    with ExitStack() as stack:
        members = start_members(2, stack, epochs=True, data_plane=data_plane)
        members[0].behind = 1
        controls = []
        for member, samples, weight in zip(members, (16, 16), (None, 0.0)):
            member.round = 2
            for param, grad in zip(member.params, member.gradients(2)):
                param.grad = grad.clone()
            member.averager.accumulate_grads_(batch_size=samples)
            member.averager.set_target_group_size(2)
            controls.append(member.averager.step(weight=weight, wait=False, timeout=30))
        gathered = finish_round(members, controls)
        assert all(len(g) == 2 for g in gathered), gathered
        for member in members:
            assert_mean(member.averaged(), members[0].gradients(2), "none")


def _victim(initial_peers: list, timeout: float, conn) -> None:
    """A member in its own process (spawned): rounds on command, then dies by the test's SIGKILL."""
    mp.set_start_method("fork", force=True)  # hivemind forks its helpers, as in a peer (spawn is this process's default)
    with ExitStack() as stack:
        member = Member(2, stack, initial_peers, timeout=timeout, epochs=True)
        conn.send("ready")
        while True:
            command, round_ = conn.recv()
            if command == "round":
                run_round([member], round_, [1], live=3)
                conn.send("done")
            else:  # join the round's group, never its collective
                member.round = round_
                member.averager.set_target_group_size(3)
                member.averager.schedule_step(timeout=30)
                conn.send("scheduled")


def test_member_killed_mid_allreduce_fails_the_round_within_the_timeout_then_survivors_average() -> None:
    # in a standing group (the members publish epochs): the round has no matchmaking, only the collective, where
    # the survivors wait for the victim; a matched round's collective is the same code on the same kind of group
    timeout = 8.0
    with ExitStack() as stack:
        survivors = start_members(2, stack, timeout=timeout, epochs=True)
        ours, theirs = mp.get_context("spawn").Pipe()
        victim = mp.get_context("spawn").Process(target=_victim, args=(survivors[0].dht.get_visible_maddrs(), timeout, theirs))
        victim.start()
        stack.callback(victim.kill)
        assert ours.poll(60) and ours.recv() == "ready"

        def everyone(round_: int) -> list:
            ours.send(("round", round_))
            gathered = run_round(survivors, round_, [1, 1], live=3)
            assert ours.poll(60) and ours.recv() == "done"
            return gathered

        # round 1 builds and caches the three-member process group; with epochs published, round 2 finds the group
        # settled, so round 3 runs in it without matchmaking
        rounds = 2
        for round_ in range(1, rounds + 1):
            assert all(len(g) == 3 for g in everyone(round_))
        ours.send(("schedule", rounds + 1))
        assert ours.poll(60) and ours.recv() == "scheduled"
        controls = [m.start_round(rounds + 1, 3, 1) for m in survivors]
        assert all((m.averager.standing_rounds == 0) for m in survivors)
        deadline = time.monotonic() + 20
        while not all(c.stage == AveragingStage.RUNNING_ALLREDUCE for c in controls):
            assert time.monotonic() < deadline, [c.stage for c in controls]
            time.sleep(0.01)
        time.sleep(0.5)  # the survivors are now blocked in the collective, waiting for the victim
        assert not any(c.done() for c in controls)
        assert all(c.inner is None for c in controls)  # a standing round: no matchmaking at all
        doomed = psutil.Process(victim.pid)
        for process in [*doomed.children(recursive=True), doomed]:  # the member and its averager's process
            process.kill()
        killed = time.monotonic()
        for control in controls:
            with pytest.raises(Exception):
                control.result(timeout + 5)
        assert time.monotonic() - killed < timeout + 2  # failed within the averaging timeout, no hang
        for member in survivors:
            # what hivemind.Optimizer does after a failed round: reload the accumulators and step with the local
            # gradient, which must be this member's own (hivemind's step had zeroed the accumulators before)
            member.averager.load_accumulators_into_averager_()
            assert_mean(member.averaged(), member.gradients(rounds + 1), "none")
            member.averager.notify_used_averaged_gradients()
            assert member.averager.last_outcome == "failed"
            assert member.averager.wants_state_averaging  # the group will average parameters next
            member.averager.reset_accumulated_grads_()

        gathered = run_round(survivors, rounds + 2, [1, 2])  # the next round matches and builds a group of two
        assert all(len(g) == 2 for g in gathered)
        want = weighted_mean(survivors, rounds + 2, [1, 2])
        for member in survivors:
            assert_mean(member.averaged(), want, "none")
            assert member.averager.data_plane_builds == 2
            assert member.averager.rounds == {"ok": rounds + 1, "failed": 1, "local_only": 0}


def test_a_settled_group_skips_matchmaking_until_someone_joins() -> None:
    with ExitStack() as stack:
        pair = start_members(2, stack, epochs=True)
        for round_ in (1, 2):  # the first round asks to resync (new members); the second is settled
            run_round(pair, round_, [1, 1])
        assert [m.averager.standing_rounds for m in pair] == [0, 0]
        # rounds 3 and 4 run in the standing group; in round 4 a member already counts a third live peer. From
        # here on the pair's rounds check the members' parameters: equal in round 3, so the routine parameter
        # round is skipped; not in round 4, whose group is not every live peer
        for member in pair:
            member.averager.check_parameters = lambda: True
        for round_, weights, live in ((3, [2, 1], 2), (4, [1, 3], 3)):
            controls = [m.start_round(round_, live, w) for m, w in zip(pair, weights)]
            assert all(isinstance(c, PlaneRound) and c.inner is None for c in controls)
            finish_round(pair, controls)
            for member in pair:
                assert_mean(member.averaged(), weighted_mean(pair, round_, weights), "none")
                assert member.averager.state_rounds_skipped == 1
        assert [m.averager.standing_rounds for m in pair] == [2, 2]
        # round 4 showed a third live peer, so round 5 finds its group through matchmaking, with the joiner in
        joiner = Member(2, stack, pair[0].dht.get_visible_maddrs(), epochs=True)
        trio = [*pair, joiner]
        gathered = run_round(trio, 5, [1, 1, 1])
        assert all(len(g) == 3 for g in gathered)
        for member in trio:
            assert_mean(member.averaged(), weighted_mean(trio, 5, [1, 1, 1]), "none")
        assert [m.averager.data_plane_builds for m in trio] == [2, 2, 1]
        assert [m.averager.standing_rounds for m in trio] == [2, 2, 0]
        assert [m.averager.rounds["ok"] for m in trio] == [5, 5, 1]
        run_round(trio, 6, [1, 1, 1])  # the joiner's first round asked to resync; this one is settled
        # round 7 stands; the joiner leaves in it: it tags along with weight 0 and says so (what a peer's shutdown
        # does between rounds), so the pair's round still averages, over the pair alone
        controls = [m.start_round(7, 3, w) for m, w in zip(pair, [1, 2])]
        joiner.averager.leaving = True
        assert joiner.averager.in_standing_group
        joiner.averager.tag_along(joiner.averager.schedule_step(), timeout=30)
        assert all(control.inner is None for control in controls)
        assert all(len(gathered) == 3 for gathered in finish_round(pair, controls))
        for member in pair:
            assert_mean(member.averaged(), weighted_mean(pair, 7, [1, 2]), "none")
            assert not member.averager.in_standing_group  # a member left: the next round matches again
        joiner.averager.shutdown()
        with torch.no_grad():
            pair[1].params[1][0] += 1e-3  # the pair's parameters differ now: no skipping
        gathered = run_round(pair, 8, [1, 1])
        assert all(len(g) == 2 for g in gathered)
        assert [m.averager.rounds for m in pair] == [{"ok": 8, "failed": 0, "local_only": 0}] * 2
        assert [m.averager.state_rounds_skipped for m in pair] == [1, 1]
        with torch.no_grad():
            pair[1].params[1][0] -= 1e-3  # equal again (0 + 1e-3 - 1e-3 is 0 in float32)
        run_round(pair, 9, [1, 1])
        assert [m.averager.state_rounds_skipped for m in pair] == [2, 2]


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


@pytest.mark.parametrize("aggregation", ["clipped", "mean"])
def test_a_round_without_the_group_falls_back_to_no_gradient_when_clipped(aggregation: str) -> None:
    """hivemind.Optimizer's fallback after a failed round loads the local gradient (load_accumulators_into_averager_
    outside a step). Clipped: with others live, nothing unbounded is applied (a faulty peer's own x1e4 gradient put
    its parameters, then everyone's through the next parameter round, far off in CI); alone, the local gradient."""
    with ExitStack() as stack:
        member = Member(0, stack, [], aggregation=aggregation)
        for live, alone in ((3, False), (1, True)):
            for param, grad in zip(member.params, member.gradients(1)):
                param.grad = grad.clone()
            member.averager.accumulate_grads_(batch_size=16)
            member.averager.set_target_group_size(live)
            member.averager.load_accumulators_into_averager_()
            local = member.gradients(1)
            skipped = aggregation == "clipped" and not alone
            for got, want in zip(member.averaged(), local):
                assert_close(got, torch.zeros_like(want) if skipped else want)
            member.averager.reset_accumulated_grads_()
        assert member.averager.unbounded_steps_skipped == (1 if aggregation == "clipped" else 0)
