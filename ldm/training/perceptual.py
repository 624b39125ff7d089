"""LPIPS (Zhang et al. 2018) for autoencoder training, without downloads.

The learned linear heads ship inside torchmetrics; the VGG16 backbone's ImageNet weights
are read from a given file or from torch's hub cache (where torchvision would have
downloaded them), and a missing file is one clear error naming where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.io import load_into, read_weights

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def vgg16_weights_path(path: str | Path | None = None) -> Path:
    """The VGG16 weights file: ``path``, else ``<torch hub dir>/checkpoints/vgg16-397923af.pth``."""
    found = (
        Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    )
    if not found.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 ImageNet weights at {found}, and nothing is "
            f"downloaded. Fetch {VGG16_URL} on a machine with network and copy it there "
            "(or set TORCH_HOME, or pass vgg_weights=<file>), or train with "
            "perceptual_weight=0."
        )
    return found


class LPIPS(nn.Module):
    """``lpips(x, y)`` -> (B,) perceptual distances of images in [-1, 1]; frozen."""

    def __init__(self, vgg_weights: str | Path | None = None):
        super().__init__()
        import torchvision
        from torchmetrics.functional.image.lpips import _LPIPS

        weights = vgg16_weights_path(vgg_weights)
        # pnet_rand: build the backbone without torchvision's download; filled below.
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
        # LPIPS reads the convolutional trunk only (vgg16's "features.*").
        state = read_weights(weights)
        features = torchvision.models.vgg16(weights=None).features
        trunk = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        load_into(features, trunk, what=f"VGG16 features from {weights}")
        backbone = self.net.net
        for part in (getattr(backbone, f"slice{i}") for i in range(1, 6)):
            for name, layer in part.named_children():  # named by their index in features
                layer.load_state_dict(features[int(name)].state_dict())
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: always eval

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y, normalize=False).flatten()  # inputs already in [-1, 1]
