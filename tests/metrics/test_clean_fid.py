"""torchscript-clean: FID as clean-fid computes it (its resize, its order of operations,
its Fréchet distance), with the same TorchScript InceptionV3, run offline."""

import numpy as np
import pytest
import torch

from ldm.data.builtin import ShapesDataset
from ldm.metrics.extractors import fid_helper_file, make_extractor, to_uint8
from ldm.metrics.scores import GenerativeMetrics

cleanfid = pytest.importorskip("cleanfid")
from cleanfid.fid import frechet_distance  # noqa: E402
from cleanfid.resize import build_resizer  # noqa: E402

N = 8


def _images(split: str) -> torch.Tensor:
    data = ShapesDataset(split, size=32, num_samples=(N, N, N))
    return to_uint8(torch.stack([data[i]["image"] for i in range(N)]))


def _clean_fid_features(images: torch.Tensor) -> np.ndarray:
    """clean-fid's pipeline: its clean resizer on each HWC uint8 image, the float32 array
    as a CHW tensor, then InceptionV3W's (x - 128) / 128 into the network's layers."""
    resize = build_resizer("clean")
    batch = torch.stack(
        [torch.tensor(resize(i.permute(1, 2, 0).numpy()).transpose((2, 0, 1))) for i in images]
    )
    network = torch.jit.load(str(fid_helper_file())).eval()
    with torch.no_grad():
        return network.net.layers.forward((batch - 128) / 128).view(len(images), 2048).numpy()


def _their_fid(a: np.ndarray, b: np.ndarray) -> float:
    stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (a, b)]
    return float(frechet_distance(*stats[0], *stats[1]))


def test_clean_mode_gives_clean_fids_fid():
    real, fake = _images("val"), _images("test")
    extractor = make_extractor("torchscript-clean:fid-helper")
    with torch.no_grad():
        ours = [extractor.features(x) for x in (real, fake)]
    theirs = [_clean_fid_features(x) for x in (real, fake)]
    np.testing.assert_allclose(ours[0].numpy(), theirs[0], rtol=0, atol=1e-4)
    # Their Fréchet distance on the first 256 features (scipy's sqrtm of a 2048 x 2048
    # matrix alone takes half a minute on a slow core; the formula is what is compared).
    metrics = GenerativeMetrics(ours[0][:, :256], kid_subset_size=N, pr_k=None)
    metrics.update(ours[1][:, :256], torch.arange(N))
    fid = float(metrics.compute()["fid"])
    assert fid == pytest.approx(_their_fid(*(t[:, :256] for t in theirs)), rel=1e-4)
    assert "clean-fid" in extractor.provenance["resize"]
    # The resize matters: torchmetrics' bilinear resize gives the same images other features.
    with torch.no_grad():
        default = make_extractor("torchscript:fid-helper").features(real)
    assert (default - ours[0]).norm() > 1e-2 * ours[0].norm()
