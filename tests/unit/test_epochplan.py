"""The epoch plan: every member computes the same split of the next epoch, the target is met, speeds are matched."""

from __future__ import annotations

import math

import pytest

from mesh.epochplan import Member, members_from_gathered, plan_steps


def finish_times(members: list[Member], steps: dict[str, int]) -> list[float]:
    return [steps[m.key] * m.batch_size / m.samples_per_second for m in members]


def test_equal_peers_take_equal_steps_and_meet_the_target_exactly() -> None:
    members = [Member(f"p{i}", 300.0, 32) for i in range(2)]
    assert plan_steps(members, 512) == {"p0": 8, "p1": 8}  # 512 / (2 * 32), as DDP at the same global batch
    assert plan_steps([Member(f"p{i}", 300.0, 16) for i in range(4)], 1024) == {f"p{i}": 16 for i in range(4)}


def test_small_differences_in_measured_speed_do_not_change_the_split() -> None:
    # EMA noise of a few percent must not give one peer an extra step (the other would wait a whole step)
    members = [Member("a", 296.0, 32), Member("b", 311.0, 32)]
    assert plan_steps(members, 512) == {"a": 8, "b": 8}


@pytest.mark.parametrize(
    ("rates", "batches", "target"),
    [((600.0, 300.0), (32, 32), 512), ((100.0, 250.0, 400.0), (16, 32, 8), 1000), ((1.0, 1000.0), (32, 32), 64), ((50.0,), (7,), 100)],
)
def test_the_plan_reaches_the_target_and_balances_finish_times(rates, batches, target) -> None:
    members = [Member(f"p{i}", rate, batch) for i, (rate, batch) in enumerate(zip(rates, batches))]
    steps = plan_steps(members, target)
    assert sum(steps[m.key] * m.batch_size for m in members) >= target
    assert all(count >= 1 for count in steps.values())
    ideal = target / sum(rates)  # seconds the group needs with no rounding
    slowest_step = max(m.batch_size / m.samples_per_second for m in members)
    # each member finishes within one of its own steps (and the rounding's extra steps) of the ideal time
    for m, finish in zip(members, finish_times(members, steps)):
        assert abs(finish - ideal) <= max(m.batch_size / m.samples_per_second, slowest_step) + 1e-9


def test_the_plan_is_the_same_whatever_order_the_members_come_in() -> None:
    members = [Member("c", 120.0, 16), Member("a", 333.0, 32), Member("b", 90.0, 8)]
    assert plan_steps(members, 777) == plan_steps(list(reversed(members)), 777)


def test_members_from_gathered_metadata() -> None:
    gathered = {"p1": {"rate": 310.5, "batch": 32, "live": 2}, "p2": {"rate": 290.0, "batch": 16}}
    assert members_from_gathered(gathered) == [Member("p1", 310.5, 32), Member("p2", 290.0, 16)]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"batch": 32},
        {"rate": None, "batch": 32},
        {"rate": 0.0, "batch": 32},
        {"rate": math.nan, "batch": 32},
        {"rate": 300.0, "batch": 0},
        {"rate": 300.0, "batch": True},
        {"rate": "fast", "batch": 32},
    ],
)
def test_a_member_without_a_usable_pace_means_no_plan(bad) -> None:
    assert members_from_gathered({"p1": {"rate": 300.0, "batch": 32}, "p2": bad}) is None
