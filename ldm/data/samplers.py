"""Samplers that shard an epoch over DDP ranks themselves and resume mid-epoch.

Both take ``(seed, epoch)`` for their order, the same on every rank, and deal it out by
rank; ``skip(epoch, n)`` drops the first ``n`` items of an epoch's order on this rank,
which is how a run resumed mid-epoch sees exactly the batches the interrupted run had not
(``DataModule.load_state_dict`` calls it). ``__len__`` stays the full epoch's length, so
Lightning's progress counters, restored from the checkpoint, end the epoch where they
should.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class _Resumable:
    epoch: int
    _skip: tuple[int, int] | None = None  # (epoch, items to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, epoch: int, count: int) -> None:
        """Leave out the first ``count`` items of ``epoch`` (a resumed run's done part)."""
        self._skip = (epoch, count) if count > 0 else None

    def _skipped(self, items: list) -> list:
        if self._skip is not None and self._skip[0] == self.epoch:
            return items[self._skip[1] :]
        return items


class ShardedSampler(_Resumable, Sampler[int]):
    """This rank's indices of an epoch: a permutation of ``range(length)`` seeded by
    ``(seed, epoch)`` (or the identity without ``shuffle``), dealt round-robin to the ranks.

    With ``drop_tail`` (training) every rank gets ``length // world_size`` indices, so the
    ranks step together; without it (evaluation) every index is served exactly once.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_tail: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.drop_tail = rank, world_size, drop_tail
        self.epoch = 0

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.drop_tail:
            order = order[: self.length // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._skipped(self._order()))

    def __len__(self) -> int:
        if self.drop_tail:
            return self.length // self.world_size
        return len(range(self.rank, self.length, self.world_size))


class BucketBatchSampler(_Resumable, Sampler[list[int]]):
    """Batches of indices that share a bucket; shuffled anew each epoch.

    ``buckets[i]`` is the bucket of sample ``i``. Under DDP each rank takes every
    ``world_size``-th batch of one shared order, and the batch count is cut to a multiple
    of ``world_size`` (the few batches beyond it wait for the next epoch's shuffle) so that
    every rank runs the same number of steps.
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,  # drop each bucket's last partial batch
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.buckets, self.batch_size, self.shuffle = list(buckets), batch_size, shuffle
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.epoch = 0

    @property
    def sampler(self) -> BucketBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on a batch sampler's ``sampler``."""
        return self

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(tuple(bucket), []).append(index)
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) // self.world_size * self.world_size
        return batches[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._skipped(self._batches()))

    def __len__(self) -> int:
        return len(self._batches())
