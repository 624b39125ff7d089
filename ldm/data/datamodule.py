"""One LightningDataModule for every data source, chosen by config (``data=shapes``,
``data=folder data.dataset.path=...``, ``data=wds data.dataset.urls=...``).

The source is a factory ``dataset(split=...) -> Dataset`` (a Hydra ``_partial_``); the
module builds each split once, serves train / val / test loaders, and exposes
``dataset(split)`` for the held-out sets that FID reference statistics are computed on.
Held-out splits are never augmented: a factory's ``flip`` is turned off and its ``crop``
set to ``center`` for val and test.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.builtin import check_split
from ldm.data.transforms import BucketBatchSampler

DatasetFactory = Callable[..., Dataset]


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
        """Reshuffle streaming sources and bucket batches for ``epoch`` (training calls it)."""
        self.epoch = epoch
        dataset = self._datasets.get("train")
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            generator=generator,
        )
        if isinstance(dataset, IterableDataset):
            return DataLoader(
                dataset, batch_size=batch_size, drop_last=train and self.drop_last, **common
            )
        buckets = getattr(dataset, "buckets", None)
        if buckets is not None:
            rank, world_size = self._rank()
            sampler = BucketBatchSampler(
                buckets,
                batch_size,
                shuffle=train and self.shuffle,
                drop_last=train and self.drop_last,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
            )
            sampler.set_epoch(self.epoch)
            return DataLoader(dataset, batch_sampler=sampler, **common)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            **common,
        )

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
