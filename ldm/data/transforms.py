"""Image transforms shared by every data source, and aspect-ratio bucketing.

``ImageTransform`` turns an RGB PIL image into a (3, H, W) float tensor in [-1, 1]: resize
so the image covers the target (aspect kept, antialiased), crop (center or random), flip
(random, horizontal), scale. Bucketing (NovelAI 2022, as in SDXL's training) groups
mixed-size images by aspect ratio into resolutions of about the same area, so a batch
shares one shape and little of each image is cropped away.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Sampler

Crop = Literal["center", "random"]
Interpolation = Literal["bilinear", "bicubic", "lanczos", "nearest"]
_MODES = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "lanczos": TF.InterpolationMode.LANCZOS,
    "nearest": TF.InterpolationMode.NEAREST,
}


class ImageTransform:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""

    def __init__(
        self,
        size: int | Sequence[int] = 32,  # output side, or (height, width)
        crop: Crop = "center",  # where to cut the part that does not fit the aspect ratio
        flip: bool = False,  # random horizontal flip (p = 0.5)
        interpolation: Interpolation = "bilinear",  # resize filter (antialiased)
    ):
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {size}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if interpolation not in _MODES:
            raise ValueError(
                f"interpolation must be one of {sorted(_MODES)}, got {interpolation!r}"
            )
        self.size, self.crop, self.flip, self.interpolation = (
            (height, width),
            crop,
            flip,
            interpolation,
        )

    def __call__(self, image: Image.Image, size: Sequence[int] | None = None) -> Tensor:
        """Transform ``image``; ``size`` (height, width) overrides the default (buckets)."""
        height, width = self.size if size is None else size
        if image.mode != "RGB":
            raise ValueError(f"ImageTransform takes RGB images, got mode {image.mode}")
        scale = max(height / image.height, width / image.width)
        if (image.height, image.width) != (height, width):
            new = (max(height, round(image.height * scale)), max(width, round(image.width * scale)))
            image = TF.resize(
                image, list(new), interpolation=_MODES[self.interpolation], antialias=True
            )
        top, left = image.height - height, image.width - width
        if self.crop == "random":
            top = int(torch.randint(top + 1, ()).item())
            left = int(torch.randint(left + 1, ()).item())
        else:
            top, left = top // 2, left // 2
        image = TF.crop(image, top, left, height, width)
        if self.flip and torch.rand(()) < 0.5:
            image = TF.horizontal_flip(image)
        tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)  # (3, H, W) in [0, 1]
        return tensor * 2.0 - 1.0


# --------------------------------------------------------------------------- buckets


def make_buckets(
    area: int = 512 * 512,  # target pixels per image (e.g. 512^2)
    multiple: int = 64,  # sides are multiples of this (the VAE factor x the UNet's)
    max_ratio: float = 2.0,  # longest side / shortest side
) -> list[tuple[int, int]]:
    """(height, width) resolutions of at most ``area`` pixels, sides multiples of
    ``multiple``, aspect ratios from 1 / ``max_ratio`` to ``max_ratio``, widest first."""
    if multiple < 1 or area < multiple * multiple:
        raise ValueError(f"area {area} must hold at least one {multiple}x{multiple} tile")
    buckets = set()
    side = multiple
    while side * side <= area * max_ratio:
        other = (area // side) // multiple * multiple
        if other >= multiple and max(side, other) / min(side, other) <= max_ratio:
            buckets.add((side, other))
            buckets.add((other, side))
        side += multiple
    return sorted(buckets, key=lambda hw: hw[1] / hw[0], reverse=True)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to ``height`` x ``width``."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a bucket; shuffled anew each epoch (``set_epoch``).

    ``buckets[i]`` is the bucket of sample ``i``. Under DDP each rank takes every
    ``world_size``-th batch of one shared order, and the batch count is cut to a multiple
    of ``world_size`` so that every rank runs the same number of steps.
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
