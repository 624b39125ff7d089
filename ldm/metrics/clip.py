"""CLIP score (Hessel et al. 2021): ``100 * max(cos(E_image, E_text), 0)`` with an OpenCLIP
model whose weights are local (a tag in the cache, or a file); nothing is downloaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.openclip import find_openclip_weights


class OpenCLIPScore(nn.Module):
    """``score(uint8 images (B, 3, H, W), captions) -> (B,)`` CLIP scores."""

    def __init__(
        self,
        arch: str = "ViT-B-32",
        pretrained: str | None = None,  # an open_clip tag, read from the local cache only
        weights_path: str | Path | None = None,  # or a local weights file
        cache_dir: str | Path | None = None,
        model_config: Mapping[str, Any] | None = None,  # an open_clip config instead of arch's
    ):
        super().__init__()
        import open_clip

        if pretrained is not None:
            weights_path = find_openclip_weights(arch, pretrained, cache_dir)
        if model_config is not None:
            self.model = open_clip.model.CLIP(**dict(model_config))
        else:
            self.model = open_clip.create_model(
                arch, pretrained=str(weights_path) if weights_path else None
            )
        if model_config is not None and weights_path is not None:
            open_clip.load_checkpoint(self.model, str(weights_path))
        self.model.eval().requires_grad_(False)
        self.tokenizer = (
            open_clip.get_tokenizer(arch) if model_config is None else open_clip.tokenizer.tokenize
        )
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer(
            "mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False
        )

    def train(self, mode: bool = True) -> OpenCLIPScore:
        return super().train(False)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) -> L2-normalised image embeddings (B, D)."""
        x = images.float() / 255.0
        x = F.interpolate(
            x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
        )
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        return F.normalize(self.model.encode_image(x), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Texts -> L2-normalised text embeddings (B, D)."""
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def forward(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        image, text = self.image_embeddings(images), self.text_embeddings(captions)
        return 100.0 * (image * text).sum(-1).clamp(min=0)
