"""PatchGAN discriminator: patch grid, receptive field, options."""

import pytest
import torch

from ldm.models.discriminator import PatchDiscriminator


def test_patch_grid_and_receptive_field():
    disc = PatchDiscriminator(norm="none").eval()
    assert disc(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    disc(x)[0, 0, 6, 6].backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero()
    cols = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero()
    # 70 x 70 patches (Isola et al. 2017), minus what the zero padding cuts at an edge.
    assert int(rows.max() - rows.min()) + 1 == 70 and int(cols.max() - cols.min()) + 1 == 70


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_options_and_size(norm):
    disc = PatchDiscriminator(in_channels=1, base_channels=8, layers=2, norm=norm)
    assert disc(torch.randn(4, 1, 32, 32)).shape == (4, 1, 6, 6)
    sd15 = PatchDiscriminator()  # conv 3->64->128->256->512->1, 4x4 kernels, BN after inner
    convs = 3 * 64 * 16 + 64 + (64 * 128 + 128 * 256 + 256 * 512) * 16 + 512 * 16 + 1
    assert sum(p.numel() for p in sd15.parameters()) == convs + 2 * (128 + 256 + 512)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        PatchDiscriminator(norm="layer")
