"""Every data source through the one DataModule, by config: the same batch structure;
fixed splits; clear errors; the built-in datasets' determinism and captions."""

import numpy as np
import pytest
import torch
from datautils import CONF
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from ldm.data.builtin import (
    COLOURS,
    DIGIT_WORDS,
    POSITIONS,
    SHAPES,
    SPLITS,
    DigitsDataset,
    PhotoPatchesDataset,
    ShapesDataset,
)
from ldm.data.datamodule import DataModule
from ldm.data.folder import FolderDataset, scan_folder


def datamodule(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+data={name}", *overrides])
    return instantiate(cfg.data)


SOURCES = {
    "shapes": lambda paths: datamodule("shapes", "data.batch_size=4"),
    "digits": lambda paths: datamodule("digits", "data.batch_size=4"),
    "photos": lambda paths: datamodule("photos", "data.batch_size=4"),
    "folder-sidecar": lambda paths: datamodule(
        "folder",
        f"data.dataset.path={paths['sidecar']}",
        "data.dataset.size=32",
        "data.batch_size=4",
    ),
    "folder-metadata": lambda paths: datamodule(
        "folder", f"data.dataset.path={paths['meta']}", "data.dataset.size=32", "data.batch_size=4"
    ),
    "folder-classes": lambda paths: datamodule(
        "folder",
        f"data.dataset.path={paths['classes']}",
        "data.dataset.size=32",
        "data.batch_size=4",
    ),
    "wds": lambda paths: datamodule(
        "wds", f"data.dataset.urls={paths['shards']}", "data.dataset.size=32", "data.batch_size=4"
    ),
}


@pytest.fixture
def paths(sidecar_folder, metadata_folder, class_folder, shards):
    return {
        "sidecar": sidecar_folder,
        "meta": metadata_folder,
        "classes": class_folder,
        "shards": shards,
    }


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_gives_the_same_batch_structure(source, paths):
    data = SOURCES[source](paths)
    assert isinstance(data, DataModule)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "caption", "label", "key"}
    image = batch["image"]
    assert image.dtype == torch.float32 and image.shape == (4, 3, 32, 32)
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert len(batch["key"]) == 4 and len(set(batch["key"])) == 4
    if source not in ("folder-sidecar",):  # every other source here has labels
        assert (batch["label"] >= 0).all()
    if source != "folder-classes":
        assert all(c for c in batch["caption"])


def test_held_out_splits_are_fixed_disjoint_and_unaugmented(class_folder):
    for cls, kwargs in ((ShapesDataset, {}), (DigitsDataset, {}), (PhotoPatchesDataset, {})):
        keys = {split: [cls(split, **kwargs)[i]["key"] for i in range(20)] for split in SPLITS}
        assert not set(keys["train"]) & set(keys["val"]) and not set(keys["val"]) & set(
            keys["test"]
        )
        again = [cls("val", **kwargs)[i]["key"] for i in range(20)]
        assert again == keys["val"]
    assert [len(DigitsDataset(s)) for s in SPLITS] == [1437, 180, 180]
    # Train flips and random crops; the held-out splits of the same factory do not.
    data = datamodule("folder", f"data.dataset.path={class_folder}", "data.dataset.size=16")
    assert data.dataset("train").transform.flip and data.dataset("train").transform.crop == "random"
    assert not data.dataset("val").transform.flip and data.dataset("val").transform.crop == "center"
    # One class order for all splits, though val lacks "cat".
    assert data.dataset("val").classes == ["cat", "dog", "sea_otter"]
    assert {r.label for r in data.dataset("val").records} == {1, 2}
    assert data.dataset("val").records[0].caption == "dog"


def test_shapes_are_deterministic_and_match_their_captions():
    a, b = ShapesDataset("train", seed=3), ShapesDataset("train", seed=3)
    assert torch.equal(a[7]["image"], b[7]["image"]) and a[7]["caption"] == b[7]["caption"]
    assert not torch.equal(a[7]["image"], ShapesDataset("train", seed=4)[7]["image"])
    big = ShapesDataset("train", size=64)
    words = {"shape": set(), "colour": set(), "position": set()}
    for index in range(200):
        spec = big.spec(index)
        image = (big[index]["image"] + 1) * 127.5  # (3, 64, 64) in 0..255
        assert abs(spec.x - POSITIONS[spec.position][0]) <= 0.05
        centre = image[:, int(spec.y * 64), int(spec.x * 64)]
        # The shape's centre pixel has the colour the caption names.
        assert (centre - torch.tensor(COLOURS[spec.colour])).abs().max() < 8, spec
        assert big[index]["label"] == SHAPES.index(spec.shape)
        words["shape"].add(spec.shape)
        words["colour"].add(spec.colour)
        words["position"].add(spec.position)
    assert len(words["shape"]) == len(SHAPES) and len(words["colour"]) == len(COLOURS)
    assert len(words["position"]) == len(POSITIONS)


def test_digits_captions_name_their_labels():
    data = DigitsDataset("test", size=16)
    for i in range(10):
        sample = data[i]
        assert sample["caption"] == f"a handwritten digit {DIGIT_WORDS[sample['label']]}"
        assert sample["image"].shape == (3, 16, 16)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        FolderDataset(tmp_path / "empty")
    (tmp_path / "some").mkdir()
    from datautils import shape_image

    shape_image(0)[0].save(tmp_path / "some" / "a.png")
    shape_image(1)[0].save(tmp_path / "some" / "b.png")
    (tmp_path / "some" / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no caption \(strict mode\): b.png"):
        FolderDataset(tmp_path / "some", strict=True)
    records, _ = scan_folder(tmp_path / "some")  # not strict: "" for the missing caption
    assert [r.caption for r in records] == ["a caption", None]
    assert FolderDataset(tmp_path / "some", size=8)[1]["caption"] == ""
    with pytest.raises(ValueError, match="has no val split"):
        FolderDataset(tmp_path / "some", split="val")
    with pytest.raises(MissingConfigException, match="data/imagenet"):
        datamodule("imagenet")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        ShapesDataset("valid")
    with pytest.raises(ValueError, match="names 1 file"):
        (tmp_path / "some" / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}')
        scan_folder(tmp_path / "some")


def test_photo_patches_are_real_photo_content():
    data = PhotoPatchesDataset("train")
    images = torch.stack([data[i]["image"] for i in range(0, len(data), 25)])
    assert images.std() > 0.2  # textured, not flat
    assert len({data[i]["label"] for i in range(len(data))}) == 10
    assert np.isclose(
        (len(PhotoPatchesDataset("val")) + len(PhotoPatchesDataset("test"))) / len(data),
        0.25,
        atol=0.1,
    )
