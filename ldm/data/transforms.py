"""Image transforms shared by every data source, and aspect-ratio bucketing.

``ImageTransform`` turns an RGB PIL image into a (3, H, W) float tensor in [-1, 1]: resize
so the image covers the target (aspect kept, antialiased), crop (center or random), flip
(random, horizontal), scale. Bucketing (NovelAI 2022, as in SDXL's training) groups
mixed-size images by aspect ratio into resolutions of about the same area, so a batch
shares one shape and little of each image is cropped away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

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
