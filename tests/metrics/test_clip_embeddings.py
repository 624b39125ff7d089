"""CMMD's CLIP embeddings offline (random weights in a local file): our extractor against
open_clip's forward on input preprocessed as the CMMD reference code does."""

import numpy as np
import open_clip
import pytest
import torch

from ldm.metrics.extractors import make_extractor
from ldm.metrics.scores import rbf_mmd

ARCH = "ViT-S-32"  # the same code path as CMMD's ViT-L-14-336, smaller


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)  # no OpenAI weights for this arch: plain GELU
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def cmmd_reference_embed(model, images: np.ndarray, size: int) -> torch.Tensor:
    """google-research/cmmd's embed(): [0, 1] NHWC images, torch bicubic resize, CLIP
    normalisation, the projected image embedding over its norm."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    embeds = model.encode_image((x - mean) / std)
    return embeds / torch.linalg.norm(embeds, axis=-1, keepdims=True)


def test_embeddings_match_the_cmmd_reference(weights):
    path, model = weights
    extractor = make_extractor(f"clip-{ARCH}:{path}")
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 48, 40), generator=generator).to(torch.uint8)
    with torch.no_grad():
        ours = extractor.features(images)
        nhwc = images.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255.0
        want = cmmd_reference_embed(model, nhwc, 224)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    assert extractor.num_features == 384 and extractor.provenance["extractor"] == "clip-ViT-S-32"
    assert torch.allclose(ours.norm(dim=1), torch.ones(4), atol=1e-6)


def test_cmmd_of_a_set_against_itself_is_zero(weights):
    path, _ = weights
    extractor = make_extractor(f"clip-{ARCH}:{path}")
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = extractor.features(images.to(torch.uint8))
    assert float(rbf_mmd(features, features, unbiased=False)) == pytest.approx(0.0, abs=1e-9)
