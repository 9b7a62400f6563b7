"""A task's data as the trainer draws it: endless batches from whatever ``make_batches`` returned, and the position
a checkpoint keeps, so that a restarted peer goes on where it was instead of replaying its data.

``make_batches`` may return:
- an **iterator** (a generator, ``iter(...)``): drawn as it is; it must not end (the built-in tasks' streams are
  endless). One that ends is a mistake, said in one line, not a bare ``StopIteration``;
- any other **iterable** (a ``DataLoader``, a list, a dataset): iterated again for every pass, with
  ``set_epoch(pass)`` called first on it or on its sampler where they have one (``DistributedSampler``, Hugging
  Face's iterable datasets), so that every pass is shuffled anew; passes are counted.

The position (passes begun, batches drawn in the current one) goes into the checkpoint. On resume, a loader with
``state_dict``/``load_state_dict`` (torchdata's ``StatefulDataLoader``) is restored through them; any other source
is fast-forwarded: the same pass begun again (``set_epoch`` alike), and the batches already trained on drawn and
dropped, without a step. A source whose order depends on more than its seed and pass (a shuffle seeded by the
clock) cannot be restored this way; seed it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from mesh.errors import ConfigError

logger = logging.getLogger(__name__)


def _set_epoch(source: Any, epoch: int) -> None:
    """``set_epoch`` on the source, or else on its sampler (or its batch sampler's): the first that has one."""
    batch_sampler = getattr(source, "batch_sampler", None)
    for candidate in (source, getattr(source, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if callable(getattr(candidate, "set_epoch", None)):
            candidate.set_epoch(epoch)
            return


class Batches:
    """Endless batches from what ``make_batches`` returned (see the module's docstring)."""

    def __init__(self, source: Any, task: str) -> None:
        self.task = task
        if isinstance(source, Iterator):
            self._iterable: Iterable | None = None
            self._current: Iterator | None = source
        elif isinstance(source, Iterable):
            self._iterable, self._current = source, None
        else:
            raise ConfigError(
                f"task {task!r}: make_batches returned a {type(source).__name__}, which is not iterable; "
                "return an iterator of batches, a DataLoader or another iterable"
            )
        self.passes = 0  # passes begun over a re-iterable source (0 for an iterator)
        self.position = 0  # batches drawn in the current pass (an iterator's: in all)

    @property
    def stateful(self) -> bool:
        return all(callable(getattr(self._iterable, name, None)) for name in ("state_dict", "load_state_dict"))

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        if self._current is None:
            self._begin_pass()
        assert self._current is not None
        try:
            batch = next(self._current)
        except StopIteration:
            if self._iterable is None:
                raise ConfigError(
                    f"task {self.task!r}: its batches ran out after {self.position} (make_batches returned an iterator "
                    "that ends); return an endless iterator, or an iterable such as a DataLoader, which is iterated again "
                    "every pass"
                ) from None
            if self.position == 0:
                raise ConfigError(f"task {self.task!r}: make_batches returned an iterable that yields no batch") from None
            self._begin_pass()
            return next(self)
        self.position += 1
        return batch

    def _begin_pass(self) -> None:
        assert self._iterable is not None
        _set_epoch(self._iterable, self.passes)
        self._current = iter(self._iterable)
        self.passes += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"passes": self.passes, "position": self.position}
        if self.stateful:
            state["loader"] = self._iterable.state_dict()  # type: ignore[union-attr]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state`` (a :meth:`state_dict` of the same source, from a checkpoint)."""
        passes, position = int(state.get("passes", 0)), int(state.get("position", 0))
        if self._iterable is not None and self.stateful and state.get("loader") is not None:
            self._iterable.load_state_dict(state["loader"])  # type: ignore[union-attr]
            self.passes, self.position = passes, position
            self._current = iter(self._iterable)  # a StatefulDataLoader's next iteration resumes its saved one
            logger.info("data resumed from the loader's state pass=%d batch=%d", passes, position)
            return
        if self._iterable is not None and passes > 0:
            self.passes = passes - 1
            self._begin_pass()
        for _ in range(position):  # the batches this pass had already given: drawn again, not trained on
            next(self)
        if position:
            logger.info("data fast-forwarded to where the checkpoint left it pass=%d batch=%d", max(passes, 1), position)


class PeerSampler(Sampler[int]):
    """Indices of a map-style dataset (anything with ``__len__``: a torch ``Dataset``, a Hugging Face ``datasets``
    one) in this peer's own order: a new permutation every pass, from ``seed`` (give it ``peer.data_seed``) and the
    pass alone, so that peers draw different samples at a time and a restarted peer (the same ``--identity``, so the
    same seed) is fast-forwarded to exactly the samples it had not drawn (:class:`Batches` calls ``set_epoch``).

    Why not a fixed partition (``DistributedSampler``'s ``rank``/``num_replicas``): a mesh's peers come and go, so
    there is no fixed count to split by. Each peer covers the whole dataset every pass; in one pass of all peers
    together a sample is drawn about as many times as there are peers, in different epochs of the run."""

    def __init__(self, dataset: Sized, seed: int) -> None:
        self.size, self.seed, self.epoch = len(dataset), int(seed), 0
        if self.size == 0:
            raise ConfigError("PeerSampler: the dataset is empty")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
