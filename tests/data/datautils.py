"""Helpers of the data tests: small images and shards built by the tests themselves."""

import io
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from ldm.data.builtin import ShapesDataset

CONF = Path(__file__).resolve().parents[2] / "conf"


def shape_image(index: int, split: str = "train", size: int = 40) -> tuple[Image.Image, str, int]:
    image, caption, label, _ = ShapesDataset(split, size=size).item(index)
    return image, caption, label


def write_shards(folder: Path, count: int, per_shard: int, prefix: str = "train") -> list[str]:
    """``count`` shape samples in shards of ``per_shard``; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, count, per_shard):
        path = folder / f"{prefix}-{start // per_shard:06d}.tar"
        with TarWriter(str(path)) as writer:
            for i in range(start, min(count, start + per_shard)):
                image, caption, label = shape_image(i, size=16)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                writer.write(
                    {
                        "__key__": f"sample{i:05d}",
                        "png": buffer.getvalue(),
                        "txt": caption.encode(),
                        "cls": str(label).encode(),
                    }
                )
        paths.append(str(path))
    return paths


def random_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
