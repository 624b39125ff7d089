"""Built-in datasets that work offline, each with fixed train / val / test splits.

* ``ShapesDataset``: coloured shapes drawn procedurally, with captions naming colour, shape,
  size, position and background: deterministic by (seed, split, index), and varied along
  each attribute so that text conditioning and guidance visibly matter.
* ``DigitsDataset``: the 1,797 real 8x8 handwritten digits bundled with scikit-learn
  (Alpaydin & Kaynak 1998), upscaled, captioned and labelled.
* ``PhotoPatchesDataset``: patches cut on a grid from the photos bundled with
  scikit-image, for autoencoders on natural textures; grid cells are assigned to splits,
  so held-out patches come from regions never seen in training.

Every sample is ``{"image": (3, H, W) in [-1, 1], "caption": str, "label": int, "key": str}``.
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.transforms import Crop, ImageTransform
from ldm.seeding import stable_fraction

SPLITS = ("train", "val", "test")
Sample = dict  # {"image": Tensor, "caption": str, "label": int, "key": str}


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


class _ImageDataset(Dataset, ABC):
    """A map-style dataset of PIL images + captions + labels, transformed on access."""

    def __init__(self, size: int, flip: bool, crop: Crop = "center"):
        self.transform = ImageTransform(size, crop=crop, flip=flip)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def item(self, index: int) -> tuple[Image.Image, str, int, str]:
        """(RGB image, caption, label, key) of sample ``index``."""

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, caption, label, key = self.item(index % len(self))
        return {"image": self.transform(image), "caption": caption, "label": label, "key": key}


# --------------------------------------------------------------------------- shapes

SHAPES = ("circle", "square", "triangle", "diamond", "cross")  # the label is the index here
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "light blue": (170, 210, 245),
}
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {  # centre as fractions of the side, and how captions say it
    "in the center": (0.5, 0.5),
    "in the top left": (0.3, 0.3),
    "in the top right": (0.7, 0.3),
    "in the bottom left": (0.3, 0.7),
    "in the bottom right": (0.7, 0.7),
}
_SUPERSAMPLE = 4  # drawn 4x larger, then downsampled: antialiased edges
# What every shapes caption names, in caption order: attribute -> its values (a value's
# index is its class in attribute classifiers, ldm.metrics.attributes).
SHAPE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
_CAPTION = re.compile(
    "a ({size}) ({colour}) ({shape}) ({position}) on a ({background}) background".format(
        **{name: "|".join(map(re.escape, values)) for name, values in SHAPE_ATTRIBUTES.items()}
    )
)


def parse_shapes_caption(caption: str) -> dict[str, int]:
    """The attribute classes a shapes caption names (``SHAPE_ATTRIBUTES`` indices)."""
    match = _CAPTION.fullmatch(caption.strip())
    if match is None:
        raise ValueError(
            f"{caption!r} is not a shapes caption ('a <size> <colour> <shape> <position> on a "
            "<background> background' with the values of ldm.data.builtin.SHAPE_ATTRIBUTES)"
        )
    return {
        name: values.index(found)
        for (name, values), found in zip(SHAPE_ATTRIBUTES.items(), match.groups(), strict=True)
    }


_PARTIAL = re.compile(
    "a(?: ({size}))?(?: ({colour}))? (?:({shape})|shape)(?: ({position}))?"
    "(?: on a ({background}) background)?".format(
        **{name: "|".join(map(re.escape, values)) for name, values in SHAPE_ATTRIBUTES.items()}
    )
)


def parse_partial_shapes_caption(caption: str) -> dict[str, int]:
    """The attributes a shapes prompt names, any of them left out: ``"a circle"`` ->
    ``{"shape": 0}``, ``"a red shape on a black background"`` -> colour and background,
    ``""`` -> none (the caption order is kept)."""
    if not caption.strip():
        return {}
    match = _PARTIAL.fullmatch(caption.strip())
    if match is None:
        raise ValueError(
            f"{caption!r} is not a shapes prompt: 'a [<size>] [<colour>] <shape or the word "
            "shape> [<position>] [on a <background> background]' with the values of "
            "ldm.data.builtin.SHAPE_ATTRIBUTES"
        )
    return {
        name: values.index(found)
        for (name, values), found in zip(SHAPE_ATTRIBUTES.items(), match.groups(), strict=True)
        if found is not None
    }


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    x: float  # centre and radius as fractions of the side (jittered around the named ones)
    y: float
    radius: float

    @property
    def caption(self) -> str:
        where = f"{self.position} on a {self.background} background"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    @property
    def classes(self) -> dict[str, int]:
        """Attribute -> class index (``SHAPE_ATTRIBUTES``): the exact truth of the image."""
        return {
            name: values.index(getattr(self, name)) for name, values in SHAPE_ATTRIBUTES.items()
        }


class ShapesDataset(_ImageDataset):
    """Procedural coloured shapes with descriptive captions; label = shape index."""

    def __init__(
        self,
        split: str = "train",
        *,
        size: int = 32,  # image side in pixels
        num_samples: Sequence[int] | None = None,  # (train, val, test); default 20000/1000/1000
        seed: int = 0,  # the whole dataset follows from it
    ):
        super().__init__(size, flip=False)  # captions name left and right: no flips
        counts = dict(zip(SPLITS, num_samples or (20000, 1000, 1000), strict=True))
        self.split, self.size, self.seed = check_split(split), size, seed
        self.length = counts[split]

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        """What sample ``index`` shows; fixed by (seed, split, index)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        colours = [c for c in COLOURS if c != background]  # never invisible
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        jitter = rng.uniform(-0.05, 0.05, size=3)  # position and size vary a little
        cx, cy = POSITIONS[position]
        return ShapeSpec(
            shape,
            colour,
            size,
            position,
            background,
            x=cx + jitter[0],
            y=cy + jitter[1],
            radius=SIZES[size] + jitter[2] * 0.5,
        )

    def item(self, index: int) -> tuple[Image.Image, str, int, str]:
        spec = self.spec(index)
        side = self.size * _SUPERSAMPLE
        image = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
        x, y, r = spec.x * side, spec.y * side, spec.radius * side
        _draw(ImageDraw.Draw(image), spec.shape, x, y, r, COLOURS[spec.colour])
        image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        key = f"shapes-{self.seed}-{self.split}-{index:06d}"
        return image, spec.caption, SHAPES.index(spec.shape), key


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # about the circle's area
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        points = [(x + r * math.sin(a), y - r * math.cos(a)) for a in (0, 2.0944, 4.1888)]
        draw.polygon(points, fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------- digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_HELD_OUT = 180  # digits in each of val and test; the other 1,437 train


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return digits.images, digits.target


class DigitsDataset(_ImageDataset):
    """scikit-learn's 8x8 handwritten digits, white on black, upscaled; label = digit."""

    def __init__(self, split: str = "train", *, size: int = 32, flip: bool = False):
        super().__init__(size, flip)
        self.split, self.size = check_split(split), size

    @cached_property
    def _data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, targets = _load_digits()
        order = np.random.default_rng(0).permutation(len(images))  # fixed forever
        n = DIGITS_HELD_OUT
        chosen = {"test": order[:n], "val": order[n : 2 * n], "train": order[2 * n :]}[self.split]
        return images[chosen], targets[chosen], chosen

    def __len__(self) -> int:
        return len(self._data[0])

    def item(self, index: int) -> tuple[Image.Image, str, int, str]:
        images, targets, original = self._data
        pixels = (images[index] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16
        image = Image.fromarray(pixels, mode="L").resize(
            (self.size, self.size), Image.Resampling.BICUBIC
        )
        label = int(targets[index])
        caption = f"a handwritten digit {DIGIT_WORDS[label]}"
        return image.convert("RGB"), caption, label, f"digits-{int(original[index]):04d}"


# --------------------------------------------------------------------------- photos

# skimage.data photos bundled in its wheel (no pooch download), with captions.
PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket on a launch pad",
    "hubble_deep_field": "a photo of galaxies in deep space",
    "immunohistochemistry": "a microscope photo of stained tissue",
    "retina": "a photo of a human retina",
    "brick": "a photo of a brick wall",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
}
HELD_OUT_FRACTION = 0.1  # of the grid cells of every photo, for each of val and test


@functools.lru_cache(maxsize=2)
def _load_photos(shorter_side: int) -> list[Image.Image]:
    """The PHOTOS as RGB, each resized so its shorter side is ``shorter_side``."""
    import skimage.data

    from ldm.data.images import to_rgb

    photos = []
    for name in PHOTOS:
        photo = to_rgb(Image.fromarray(getattr(skimage.data, name)()))
        scale = shorter_side / min(photo.size)
        size = (round(photo.width * scale), round(photo.height * scale))
        photos.append(photo.resize(size, Image.Resampling.LANCZOS))
    return photos


class PhotoPatchesDataset(_ImageDataset):
    """Non-overlapping ``size`` x ``size`` patches of the photos bundled with scikit-image,
    each photo first resized so its shorter side is ``photo_side``; label = photo index."""

    def __init__(
        self,
        split: str = "train",
        *,
        size: int = 32,  # patch side
        photo_side: int = 256,  # shorter side of every photo before cutting
        flip: bool = False,
    ):
        super().__init__(size, flip)
        if photo_side < size:
            raise ValueError(f"photo_side {photo_side} is smaller than the patch size {size}")
        self.split, self.size, self.photo_side = check_split(split), size, photo_side

    @property
    def _photos(self) -> list[Image.Image]:
        return _load_photos(self.photo_side)

    @cached_property
    def _cells(self) -> list[tuple[int, int, int]]:
        """(photo, row, column) of this split's patches."""
        cells = []
        for p, (name, photo) in enumerate(zip(PHOTOS, self._photos, strict=True)):
            for row in range(photo.height // self.size):
                for col in range(photo.width // self.size):
                    u = stable_fraction("photo-patches", name, self.size, self.photo_side, row, col)
                    split = (
                        "test"
                        if u < HELD_OUT_FRACTION
                        else "val"
                        if u < 2 * HELD_OUT_FRACTION
                        else "train"
                    )
                    if split == self.split:
                        cells.append((p, row, col))
        return cells

    def __len__(self) -> int:
        return len(self._cells)

    def item(self, index: int) -> tuple[Image.Image, str, int, str]:
        p, row, col = self._cells[index]
        s = self.size
        patch = self._photos[p].crop((col * s, row * s, col * s + s, row * s + s))
        name = list(PHOTOS)[p]
        return patch, PHOTOS[name], p, f"photo-{name}-{self.photo_side}-{row:03d}-{col:03d}"
