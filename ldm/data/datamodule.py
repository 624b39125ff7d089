"""One LightningDataModule for every data source, chosen by config (``data=shapes``,
``data=folder data.dataset.path=...``, ``data=wds data.dataset.urls=...``).

The source is a factory ``dataset(split=...) -> Dataset`` (a Hydra ``_partial_``); the
module builds each split once, serves train / val / test loaders, and exposes
``dataset(split)`` for the held-out sets that FID reference statistics are computed on.
Held-out splits are never augmented: a factory's ``flip`` is turned off and its ``crop``
set to ``center`` for val and test.

The module shards map-style sources over DDP ranks itself (run the Trainer with
``use_distributed_sampler=False``) and saves its position in checkpoints: a run resumed
mid-epoch continues with exactly the batches the interrupted run had not seen.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.builtin import check_split
from ldm.data.samplers import BucketBatchSampler, ShardedSampler

DatasetFactory = Callable[..., Dataset]

# This DataModule restores the data position itself (state_dict: epoch and batches done;
# the train loader then skips those), which Lightning's warning does not know.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


class DataModule(L.LightningDataModule):
    """Loaders of one data source; batches are dicts of ``image`` (B, 3, H, W) in [-1, 1],
    ``caption`` (list of B str), ``label`` (B,) int64 (-1: none) and ``key`` (list)."""

    def __init__(
        self,
        dataset: DatasetFactory,  # split -> Dataset (a Hydra _partial_)
        *,
        batch_size: int = 32,  # per process
        eval_batch_size: int | None = None,  # val / test; default batch_size
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,  # shuffle the train split (map-style sources)
        drop_last: bool = True,  # train: no ragged last batch
        seed: int = 0,  # shuffling and random crops / flips follow from it
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.factory, self.batch_size = dataset, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        self._datasets: dict[str, Dataset] = {}
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._train_sampler: ShardedSampler | BucketBatchSampler | None = None

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (built once); val / test without augmentation."""
        check_split(split)
        if split not in self._datasets:
            kwargs: dict = {"split": split}
            if split != "train":
                accepted = _keywords(self.factory)
                kwargs.update(
                    {k: v for k, v in (("flip", False), ("crop", "center")) if k in accepted}
                )
            self._datasets[split] = self.factory(**kwargs)
        return self._datasets[split]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the train split for ``epoch`` (the DataEpoch callback calls it)."""
        self.epoch = epoch
        for part in (self._datasets.get("train"), self._train_sampler):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: the epoch and the batches done in it."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"epoch": self.epoch, "batches": 0}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._resume = (state["epoch"], state["batches"])

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        rank, world_size = self._rank()
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),  # workers' base seeds
        )
        resume = self._resume if train else None
        if isinstance(dataset, IterableDataset):  # shards split themselves over ranks
            if train and hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)
            loader = _SkippingLoader(
                dataset, batch_size=batch_size, drop_last=train and self.drop_last, **common
            )
            if resume is not None:
                loader.skip(*resume)
            return loader
        buckets = getattr(dataset, "buckets", None)
        if buckets is not None:
            sampler = BucketBatchSampler(
                buckets,
                batch_size,
                shuffle=train and self.shuffle,
                drop_last=train and self.drop_last,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
            )
            skip_unit = 1  # the bucket sampler yields batches
            loader = DataLoader(dataset, batch_sampler=sampler, **common)
        else:
            sampler = ShardedSampler(
                len(dataset),
                shuffle=train and self.shuffle,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
                drop_tail=train,
            )
            skip_unit = batch_size
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                drop_last=train and self.drop_last,
                **common,
            )
        sampler.set_epoch(self.epoch)
        if train:
            self._train_sampler = sampler
            if resume is not None:
                sampler.skip(resume[0], resume[1] * skip_unit)
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)


def _keywords(factory: Callable) -> set[str]:
    """Keyword arguments ``factory`` accepts (looking through functools.partial)."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return set()
    return set(parameters)


class _SkippingLoader(DataLoader):
    """A DataLoader over a stream that can drop the first batches of one epoch (a resumed
    run's done part; the stream's order is fixed by its seed and epoch)."""

    _skip: tuple[int, int] | None = None

    def skip(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches) if batches > 0 else None

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        epoch = getattr(self.dataset, "epoch", None)
        if self._skip is not None and self._skip[0] == epoch:
            for _ in range(self._skip[1]):
                next(iterator, None)
        return iterator
