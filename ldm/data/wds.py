"""WebDataset shards (Aizman et al. 2019): tar files of samples that stream from anywhere.

A sample is the files of one key in a tar: an image (``png`` / ``jpg`` / ``jpeg`` /
``webp``), a caption (``txt``), optionally a class label (``cls``) and metadata (``json``).
``python -m ldm.data.prepare`` writes such shards (with ``ShardWriter``).

URLs are local paths, brace patterns (``data/train-{000000..000099}.tar``), ``pipe:``
commands (``pipe:aws s3 cp s3://bucket/train-000000.tar -``) or whatever webdataset's
``gopen`` opens, several joined with ``::``.

Two modes:

* plain: each epoch, the shards are shuffled with one seed shared by all ranks and dealt
  out to the ``world_size x num_workers`` readers; no sample is read twice in an epoch,
  but readers may get unequal numbers of samples.
* resampled (for DDP): every reader draws shards at random with replacement and stops
  after its share of ``samples_per_epoch``, so every rank sees exactly
  ``samples_per_epoch`` samples and runs the same number of batches (no DDP hang).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import TarWriter
from webdataset.handlers import reraise_exception, warn_and_continue
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from ldm.data.builtin import SPLITS, Sample, check_split
from ldm.data.images import open_image
from ldm.data.transforms import Crop, ImageTransform
from ldm.seeding import stable_seed

log = logging.getLogger(__name__)


class ShardWriter:
    """Samples (dicts of bytes, and ``__key__``) into ``folder/{stem}-000000.tar``, ... of
    ``per_shard`` samples each. A shard is written under a temporary name and renamed once
    complete; file times are 0, so the same samples always give the same bytes."""

    def __init__(self, folder: str | Path, stem: str, per_shard: int):
        self.folder, self.stem, self.per_shard = Path(folder), stem, per_shard
        self.paths: list[Path] = []
        self._file, self._tar, self._count = None, None, 0

    def write(self, sample: Mapping[str, str | bytes]) -> Path:
        """Add a sample; returns the path of its shard."""
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.paths.append(self.folder / f"{self.stem}-{len(self.paths):06d}.tar")
            self._file = (self.folder / f".{len(self.paths)}.tmp").open("wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=0)
        self._tar.write(dict(sample))
        self._count += 1
        path = self.paths[-1]
        if self._count == self.per_shard:
            self.close()
        return path

    def close(self) -> None:
        """Finish the open shard (if any)."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            os.replace(self._file.name, self.paths[-1])
            self._file, self._tar, self._count = None, None, 0


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """A list of shard URLs from a brace pattern / ``::``-joined string or a list."""
    shards = (
        expand_urls(urls) if isinstance(urls, str) else [u for x in urls for u in expand_urls(x)]
    )
    if not shards:
        raise ValueError(f"no shards in {urls!r}")
    return shards


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) of this process (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetSource(IterableDataset):
    """Samples from WebDataset shards, as the other sources give them."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        size: int = 256,
        crop: Crop = "center",
        flip: bool = False,
        shuffle: bool = True,  # shuffle shards each epoch and samples in a buffer
        shuffle_buffer: int = 1000,  # samples held for shuffling
        resampled: bool = False,  # draw shards with replacement (DDP: equal batch counts)
        samples_per_epoch: int | None = None,  # per rank; required with resampled
        seed: int = 0,
        rank: int | None = None,  # default: torch.distributed's, else 0
        world_size: int | None = None,
        on_error: str = "raise",  # "raise" or "warn" (log and skip a bad sample / shard)
    ):
        self.shards = expand_shards(urls)
        if resampled and not samples_per_epoch:
            raise ValueError("resampled WebDataset needs samples_per_epoch (per rank)")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.transform = ImageTransform(size, crop=crop, flip=flip)
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.samples_per_epoch, self.seed, self.on_error = samples_per_epoch, seed, on_error
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle each epoch (call before iterating; the DataModule does)."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers) of the current reader."""
        rank, world_size = distributed_rank()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return rank, world_size, worker, workers

    def _shard_urls(self, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(stable_seed(self.seed, self.epoch, rank, worker))
            while True:
                yield rng.choice(self.shards)
        shards = list(self.shards)
        if self.shuffle:
            random.Random(stable_seed(self.seed, self.epoch)).shuffle(shards)  # same on every rank
        readers = world * workers
        if len(shards) < readers and worker == 0 and rank == 0:
            log.warning(
                "%d shards for %d readers (%d ranks x %d workers): some read nothing; "
                "write more shards or use resampled=True",
                len(shards),
                readers,
                world,
                workers,
            )
        yield from shards[rank * workers + worker :: readers]

    def _quota(self, worker: int, workers: int) -> int | None:
        """Samples this worker yields in resampled mode: its share of samples_per_epoch."""
        if not self.resampled:
            return None
        share, extra = divmod(self.samples_per_epoch, workers)
        return share + (1 if worker < extra else 0)

    def __iter__(self) -> Iterator[Sample]:
        rank, world, worker, workers = self._reader()
        handler = reraise_exception if self.on_error == "raise" else warn_and_continue
        urls = ({"url": url} for url in self._shard_urls(rank, world, worker, workers))
        raw = tarfile_samples(urls, handler=handler)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(stable_seed(self.seed, self.epoch, rank, worker, "samples"))
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        quota = self._quota(worker, workers)
        count = 0
        for item in raw:
            if quota is not None and count >= quota:
                return
            try:
                sample = self.decode(item)
            except ValueError as err:
                if self.on_error == "raise":
                    raise
                log.warning("skipped a sample: %s", err)
                continue
            count += 1
            yield sample

    def decode(self, item: dict) -> Sample:
        """A raw tar sample (bytes by extension) -> image tensor, caption, label, key."""
        key = item.get("__key__", "?")
        where = f"sample {key!r} of {item.get('__url__', '?')}"
        image_key = next((k for k in IMAGE_EXTENSIONS if k in item), None)
        if image_key is None:
            raise ValueError(f"{where} has no image ({', '.join(IMAGE_EXTENSIONS)})")
        try:
            image = open_image(item[image_key])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        caption = item["txt"].decode("utf-8").strip() if "txt" in item else ""
        label = int(item["cls"].decode("utf-8").strip()) if "cls" in item else -1
        return {"image": self.transform(image), "caption": caption, "label": label, "key": key}


def _buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` items (reservoir style)."""
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


Urls = str | Sequence[str]


def split_urls(urls: Urls | Mapping[str, Urls], split: str) -> Urls:
    """The shard URLs of ``split`` from a mapping ``{split: urls}``, a folder written by
    ``python -m ldm.data.prepare`` (``{split}/*.tar``), or the train split's URLs alone."""
    check_split(split)
    if isinstance(urls, Mapping):
        if split not in urls or not urls[split]:
            raise ValueError(f"no {split} shards: give urls.{split} (have: {', '.join(urls)})")
        return urls[split]
    if isinstance(urls, str | Path) and Path(urls).is_dir():
        shards = sorted(str(p) for p in (Path(urls) / split).glob("*.tar"))
        if not shards:
            found = [s for s in SPLITS if any((Path(urls) / s).glob("*.tar"))]
            raise ValueError(
                f"no {split}/*.tar under {urls} (splits with shards: {found or 'none'})"
            )
        return shards
    if split != "train":
        raise ValueError(
            f"no {split} shards: urls names one set of shards, taken as train; give a mapping "
            f"{{train: ..., {split}: ...}} or a folder made by python -m ldm.data.prepare"
        )
    return urls


def webdataset(
    split: str = "train",
    *,
    urls: Urls | Mapping[str, Urls],  # {split: urls}, a prepared folder, or train urls
    size: int = 256,
    crop: Crop = "center",
    flip: bool = False,
    resampled: bool = False,  # train only
    samples_per_epoch: int | None = None,  # per rank, with resampled
    shuffle_buffer: int = 1000,
    seed: int = 0,
    on_error: str = "raise",
) -> WebDatasetSource:
    """The WebDataset of one split: shuffled (and resampled if asked) for train only."""
    train = split == "train"
    return WebDatasetSource(
        split_urls(urls, split),
        size=size,
        crop=crop,
        flip=flip,
        shuffle=train,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled and train,
        samples_per_epoch=samples_per_epoch if train else None,
        seed=seed,
        on_error=on_error,
    )
