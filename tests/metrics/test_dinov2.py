"""The DINOv2 extractor (FD-DINOv2) offline, with random weights in the original checkpoint
layout: dgm-eval's preprocessing and DINOv2's own position-embedding resampling, against
timm's forward on independently preprocessed input; FD against scipy."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as TF
from PIL import Image
from test_scores import reference_fid

from ldm.metrics.extractors import make_extractor
from ldm.metrics.scores import GenerativeMetrics

ARCH, TIMM = "vits14", "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random ViT-S/14 saved as the DINOv2 hub file is: 518 px (37 x 37 position
    embeddings) and a mask token."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM, img_size=518, num_classes=0)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    path = tmp_path_factory.mktemp("dinov2") / f"dinov2_{ARCH}_pretrain.pth"
    torch.save(state, path)
    return path, state


def dinov2_interpolate_pos_encoding(pos_embed, w, h, patch_size=14, offset=0.1):
    """DINOv2's ``interpolate_pos_encoding`` (dinov2/models/vision_transformer.py)."""
    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim, w0, h0 = pos_embed.shape[-1], w // patch_size, h // patch_size
    M = int(math.sqrt(N))
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=(float(w0 + offset) / M, float(h0 + offset) / M),
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dgm_eval_transform(image: torch.Tensor) -> torch.Tensor:
    """dgm-eval's DINOv2Encoder.transform (clean_resize=False) on the PIL image."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    x = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor()])(pil)
    return TF.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x)


def test_features_equal_timms_forward_on_dgm_eval_input(checkpoint):
    path, state = checkpoint
    extractor = make_extractor(f"dinov2-{ARCH}:{path}")
    reference = timm.create_model(TIMM, img_size=224, num_classes=0).eval()
    weights = {k: v for k, v in state.items() if k != "mask_token"}
    weights["pos_embed"] = dinov2_interpolate_pos_encoding(state["pos_embed"], 224, 224)
    reference.load_state_dict(weights)
    images = torch.randint(0, 256, (3, 3, 40, 56), generator=torch.Generator().manual_seed(1))
    images = images.to(torch.uint8)
    with torch.no_grad():
        ours = extractor.features(images)
        want = reference(torch.stack([dgm_eval_transform(i) for i in images]))
    assert ours.shape == (3, 384) and extractor.num_features == 384
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    assert extractor.logits(images) is None
    assert extractor.provenance["extractor"] == "dinov2-vits14"


def test_fd_on_dinov2_features_is_the_formula(checkpoint):
    path, _ = checkpoint
    extractor = make_extractor(f"dinov2-{ARCH}:{path}")
    generator = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (24, 3, 16, 16), generator=generator).to(torch.uint8)
    fake = torch.randint(0, 200, (24, 3, 16, 16), generator=generator).to(torch.uint8)
    with torch.no_grad():
        real_features, fake_features = extractor.features(real), extractor.features(fake)
    metrics = GenerativeMetrics(real_features, kid_subset_size=10, pr_k=None)
    metrics.update(fake_features, torch.arange(24))
    fd = float(metrics.compute()["fid"])
    assert fd == pytest.approx(reference_fid(real_features, fake_features), rel=1e-6)


def test_missing_weights_name_the_file_and_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        make_extractor("dinov2")
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "dinov2_vitl14_pretrain.pth") in message
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in message
    with pytest.raises(ValueError, match="unknown DINOv2 architecture"):
        make_extractor("dinov2-vitx99:x")
