"""Small image folders and shards built by the tests themselves."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from ldm.data.builtin import ShapesDataset

CONF = Path(__file__).resolve().parents[2] / "conf"


def shape_image(index: int, split: str = "train", size: int = 40) -> tuple[Image.Image, str, int]:
    image, caption, label, _ = ShapesDataset(split, size=size).item(index)
    return image, caption, label


@pytest.fixture
def sidecar_folder(tmp_path) -> Path:
    """Six images of mixed sizes, each with a .txt caption."""
    root = tmp_path / "sidecar"
    root.mkdir()
    for i in range(6):
        image, caption, _ = shape_image(i, size=40 + 8 * i)
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption + "\n")
    return root


@pytest.fixture
def metadata_folder(tmp_path) -> Path:
    root = tmp_path / "meta"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(5):
        image, caption, label = shape_image(i)
        image.save(root / "images" / f"{i}.jpg")
        rows.append({"file_name": f"images/{i}.jpg", "text": caption, "label": label})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """train/ and val/ splits of class sub-folders; val lacks one class."""
    root = tmp_path / "classes"
    for split, classes in (("train", ("cat", "dog", "sea_otter")), ("val", ("dog", "sea_otter"))):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                shape_image(c * 2 + i)[0].save(root / split / name / f"{i}.png")
    return root


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


@pytest.fixture
def shards(tmp_path) -> Path:
    """A prepared-style folder: train/ with 5 shards of 8, val/ with one of 6."""
    root = tmp_path / "shards"
    write_shards(root / "train", 40, 8, "train")
    write_shards(root / "val", 6, 6, "val")
    return root


def random_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
