"""python -m ldm.metrics.compare: folders of images scored against each other or against
cached reference statistics, as evaluate.py would score the same images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from testutils import tool_config

from ldm.app.compare import main
from ldm.data.builtin import ShapesDataset
from ldm.metrics.compare import compare
from ldm.metrics.extractors import make_extractor, to_uint8
from ldm.metrics.reference import reference_features
from ldm.metrics.scores import GenerativeMetrics


def _write(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = ShapesDataset("val", size=16, num_samples=(20, 20, 20))
    real = to_uint8(torch.stack([data[i]["image"] for i in range(20)]))
    fake = real.flip(-1)[:14]  # mirrored shapes: close, not equal
    _write(root / "real", real)
    _write(root / "fake", fake)
    big = ShapesDataset("val", size=24, num_samples=(20, 20, 20))[0]["image"]
    Image.fromarray(to_uint8(big[None])[0].permute(1, 2, 0).numpy()).save(root / "fake" / "zz.png")
    return root, data, real, fake


def test_folders_score_as_their_images_do(folders):
    root, _, real, fake = folders
    extractor = make_extractor("tiny")
    scores = compare(root / "real", root / "fake", extractor, kid_subset_size=10)
    assert scores["a"]["count"] == 20 and scores["b"]["count"] == 15  # 14 at 16 px, 1 at 24
    with torch.no_grad():
        big = np.asarray(Image.open(root / "fake" / "zz.png").convert("RGB")).copy()
        big = torch.from_numpy(big).permute(2, 0, 1)[None]
        fake_features = torch.cat([extractor.features(fake), extractor.features(big)])
        metrics = GenerativeMetrics(extractor.features(real), kid_subset_size=10)
    metrics.update(fake_features, torch.arange(15))
    want = metrics.compute()
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert scores[key] == pytest.approx(want[key], rel=1e-9), key
    assert scores["extractor"] == "tiny:64:0"


def test_reference_statistics_as_one_side(folders, tmp_path):
    root, data, _, _ = folders
    extractor = make_extractor("tiny")
    reference_features(
        data, extractor, dataset_config={"name": "shapes"}, split="val", count=20,
        cache_dir=tmp_path,
    )  # fmt: skip
    (cached,) = tmp_path.glob("reference-*.safetensors")
    from_file = compare(cached, root / "fake", extractor, kid_subset_size=10)
    from_folder = compare(root / "real", root / "fake", extractor, kid_subset_size=10)
    assert from_file["fid"] == pytest.approx(from_folder["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="another feature network"):
        compare(cached, root / "fake", make_extractor("tiny:32"))


def test_the_command_line_writes_json(folders, tmp_path, capsys):
    root, *_ = folders
    out = tmp_path / "scores.json"
    main(tool_config("compare", f"a={root / 'real'}", f"b={root / 'fake'}", "extractor=tiny",
                     "kid_subset_size=10", f"out={out}"))  # fmt: skip
    assert json.loads(out.read_text())["fid"] == json.loads(capsys.readouterr().out)["fid"]
    with pytest.raises(SystemExit):
        main(tool_config("compare", f"a={tmp_path / 'none'}", f"b={root / 'fake'}",
                         "extractor=tiny"))  # fmt: skip
    assert "no folder of images" in capsys.readouterr().err
