"""Fixtures of the data tests: small image folders and shards."""

import json
from pathlib import Path

import pytest
from datautils import shape_image, write_shards


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


@pytest.fixture
def shards(tmp_path) -> Path:
    """A prepared-style folder: train/ with 5 shards of 8, val/ with one of 6."""
    root = tmp_path / "shards"
    write_shards(root / "train", 40, 8, "train")
    write_shards(root / "val", 6, 6, "val")
    return root
