"""How many local steps each member of a complete group takes in the next epoch, so that all of them finish it
together.

hivemind ends a peer's epoch when *its own* estimate of the swarm's samples (other peers' reports, extrapolated
from their samples/s) reaches the target. Each peer makes that estimate at its own time from reports up to a second
old, so peers of one group end their epochs at different local steps: the first to arrive waits for the others,
up to a whole step (on the demo task at epoch 512, about 7 % of a trainer's time, measured with py-spy).

Members of a group that just averaged all see the same gathered metadata, which carries each member's samples/s
and batch size. From it every member computes the same plan: member i takes ``k_i`` steps, with ``k_i`` in
proportion to its speed, so that all finish at about the same time, and ``sum k_i * batch_i`` is at least the
target (equal peers: exactly ``target / (n * batch)`` steps each, the target to the sample, as DDP does it). A
peer then ends its epoch after ``k_i * batch_i`` local samples instead of at its estimate. The plan holds for one
epoch and only after a complete round; otherwise (a new member, a failed or partial round) hivemind's estimate
decides, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Member:
    key: str  # orders members the same way on every peer (the peer id)
    samples_per_second: float
    batch_size: int


def members_from_gathered(gathered: Mapping[Any, Any]) -> list[Member] | None:
    """Each member's speed and batch from a round's gathered metadata (peer id -> dict), or None when some member
    did not publish them (another version) or published nonsense."""
    members = []
    for peer_id, data in gathered.items():
        if not isinstance(data, dict):
            return None
        rate, batch = data.get("rate"), data.get("batch")
        if not isinstance(rate, (int, float)) or not isinstance(batch, int) or isinstance(batch, bool):
            return None
        if not math.isfinite(rate) or rate <= 0 or batch <= 0:
            return None
        members.append(Member(str(peer_id), float(rate), batch))
    return members


def plan_steps(members: list[Member], target: int) -> dict[str, int]:
    """Local steps per member (by key) so that the group reaches ``target`` samples and its members finish at
    about the same time. Deterministic in its inputs: every member computes the same plan."""
    if not members:
        return {}
    ordered = sorted(members, key=lambda m: m.key)
    total_rate = sum(m.samples_per_second for m in ordered)
    seconds = target / total_rate  # the time the whole group needs for the target
    steps = {m.key: max(1, round(m.samples_per_second * seconds / m.batch_size)) for m in ordered}
    planned = sum(steps[m.key] * m.batch_size for m in ordered)
    while planned < target:  # rounding fell short: one more step for the member that finishes it soonest
        soonest = min(ordered, key=lambda m: (steps[m.key] + 1) * m.batch_size / m.samples_per_second)
        steps[soonest.key] += 1
        planned += soonest.batch_size
    return steps
