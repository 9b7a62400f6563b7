"""What a task's make_batches may return (mesh/data.py), against the batches drawn by hand from the same source:
a DataLoader is iterated again every pass with set_epoch first, a source that ends or yields nothing gets one
line, and a position restored from a checkpoint gives the very batches the first peer would have drawn next."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mesh.data import Batches
from mesh.errors import ConfigError

DATA = TensorDataset(torch.arange(20.0).unsqueeze(1))


def loader(**kwargs) -> DataLoader:
    # a DistributedSampler of one replica: the usual sampler with set_epoch (its shuffle is seeded by seed + epoch)
    return DataLoader(DATA, batch_size=4, sampler=DistributedSampler(DATA, num_replicas=1, rank=0, shuffle=True, seed=3), **kwargs)


def values(batch) -> list[float]:
    return batch[0].reshape(-1).tolist()


def by_hand(passes: int) -> list[list[float]]:
    """The batches of ``passes`` passes: the sampler's epoch set to each pass before it."""
    source, drawn = loader(), []
    for epoch in range(passes):
        source.sampler.set_epoch(epoch)
        drawn += [values(b) for b in source]
    return drawn


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_is_iterated_again_every_pass_with_set_epoch(workers: int) -> None:
    batches = Batches(loader(num_workers=workers), "task")
    drawn = [values(next(batches)) for _ in range(15)]  # 5 batches per pass: three passes
    assert drawn == by_hand(3)
    assert drawn[:5] != drawn[5:10]  # set_epoch reshuffled the second pass
    assert sorted(itertools.chain(*drawn[:5])) == list(range(20))  # each pass is the whole dataset once
    assert batches.passes == 3 and batches.position == 5


def test_a_restored_position_goes_on_with_the_batches_the_peer_had_not_drawn() -> None:
    first = Batches(loader(), "task")
    before = [values(next(first)) for _ in range(7)]  # into the second pass
    state = first.state_dict()
    assert state == {"passes": 2, "position": 2}
    restarted = Batches(loader(), "task")
    restarted.load_state_dict(state)
    after = [values(next(restarted)) for _ in range(8)]
    assert before + after == by_hand(3)  # neither replayed nor skipped
    # an endless iterator (the built-in tasks'): fast-forwarded alike
    stream = Batches(itertools.count(), "task")
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    again = Batches(itertools.count(), "task")
    again.load_state_dict(stream.state_dict())
    assert next(again) == 3


class Stateful:
    """A loader with its own state (as torchdata's StatefulDataLoader): restored through it, not fast-forwarded."""

    def __init__(self) -> None:
        self.start, self.loaded = 0, None

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(range(start, 10))

    def state_dict(self) -> dict:
        return {"next": 99}

    def load_state_dict(self, state: dict) -> None:
        self.loaded, self.start = state, 6


def test_a_stateful_loader_is_restored_through_its_own_state() -> None:
    source = Stateful()
    batches = Batches(source, "task")
    next(batches)
    assert batches.state_dict() == {"passes": 1, "position": 1, "loader": {"next": 99}}
    restarted, fresh = Stateful(), None
    fresh = Batches(restarted, "task")
    fresh.load_state_dict({"passes": 1, "position": 6, "loader": {"next": 99}})
    assert restarted.loaded == {"next": 99} and next(fresh) == 6


@pytest.mark.parametrize(
    "source, message",
    [
        (42, "make_batches returned a int, which is not iterable"),
        (iter([1, 2]), "its batches ran out after 2"),
        ([], "yields no batch"),
        (DataLoader(TensorDataset(torch.zeros(0, 1)), batch_size=4), "yields no batch"),
    ],
    ids=["not-iterable", "iterator-that-ends", "empty-list", "empty-loader"],
)
def test_a_source_that_cannot_give_endless_batches_is_one_line(source, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        batches = Batches(source, "mine")
        for _ in range(5):
            next(batches)
    assert "\n" not in str(caught.value) and "'mine'" in str(caught.value)


def test_a_peer_sampler_gives_each_peer_its_own_order_every_pass_and_a_restart_the_rest_of_it() -> None:
    from mesh.data import PeerSampler

    def drawn(seed: int, count: int, state: dict | None = None) -> list[float]:
        batches = Batches(DataLoader(DATA, batch_size=4, sampler=PeerSampler(DATA, seed)), "t")
        if state is not None:
            batches.load_state_dict(state)
        return [v for batch in itertools.islice(batches, count) for v in values(batch)]

    one = drawn(11, 15)  # three passes of 5 batches
    passes = [one[i * 20 : (i + 1) * 20] for i in range(3)]
    assert all(sorted(p) == [float(i) for i in range(20)] for p in passes)  # every sample once per pass
    assert passes[0] != passes[1] != passes[2]  # a new order every pass
    assert drawn(11, 15) == one  # from the seed and the pass alone
    assert drawn(12, 5) != passes[0]  # another peer, another order
    assert drawn(11, 8, {"passes": 2, "position": 2}) == one[28:60]  # a restart: the rest of pass 2, then pass 3
    with pytest.raises(ConfigError, match="empty"):
        PeerSampler([], 0)
