"""A trained latent diffusion model with its network swapped for the exact denoiser of its
training latents: the same VAE, latent scale, schedule, prediction type, samplers and
guidance, and no network error. Sampler comparisons on it separate what the sampler does
from what the network gets wrong (docs/ddim-study.md).

The training latents are the posterior means of a latent cache's ``train`` split, scaled as
the model scales them; the data distribution is their mixture with one isotropic std, the
root-mean-square posterior std of the cache (``EmpiricalMixture``). A caption conditions on
the training latents with exactly that caption; the empty caption on all of them.

    python evaluate.py checkpoint=<ldm .ckpt> exact_denoiser=<latent cache root>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.diffusion.analytic import EmpiricalMixture
from ldm.models.vae import DiagonalGaussian
from ldm.pipeline import Pipeline


class CaptionGroups(nn.Module):
    """In the conditioner's place: a caption becomes the index of its group of training
    latents (``{"group": (B,)}``); the empty caption is -1 (every latent)."""

    input_key = "caption"

    def __init__(self, captions: Sequence[str]):
        super().__init__()
        self.index = {c: i for i, c in enumerate(sorted(set(captions)))}
        self.register_buffer("device_probe", torch.zeros(()), persistent=False)

    def groups_of(self, captions: Sequence[str]) -> Tensor:
        missing = sorted({c for c in captions if c and c not in self.index})
        if missing:
            raise ValueError(
                f"no training latent has the caption {missing[0]!r} ({len(missing)} such "
                "captions): the exact conditional denoiser needs at least one"
            )
        return torch.tensor([self.index[c] if c else -1 for c in captions])

    def forward(self, texts: Sequence[str], *, dropped: Tensor | None = None, **_) -> dict:
        group = self.groups_of(texts)
        if dropped is not None:
            group = group.masked_fill(dropped.cpu(), -1)
        return {"group": group.to(self.device_probe.device)}

    def empty(self, batch_size: int = 1) -> dict:
        return {"group": torch.full((batch_size,), -1, device=self.device_probe.device)}


class ExactDenoiser(nn.Module):
    """In the UNet's place: ``(x_t, t, group) -> prediction`` of ``EmpiricalMixture``."""

    def __init__(self, mixture: EmpiricalMixture, schedule, prediction: str):
        super().__init__()
        self.mixture = mixture
        self.model = mixture.denoiser(schedule, prediction)

    def forward(self, x_t: Tensor, t: Tensor, group: Tensor | None = None) -> Tensor:
        return self.model(x_t, t, group)


def training_mixture(vae: nn.Module, root: str | Path) -> tuple[EmpiricalMixture, CaptionGroups]:
    """The scaled posterior means of ``root/train`` as an ``EmpiricalMixture`` grouped by
    caption, and the conditioner that maps captions to those groups."""
    from ldm.data.latents import InMemoryLatents, fingerprint

    cache = InMemoryLatents(Path(root) / "train")
    if cache.info.get("vae_fingerprint") != fingerprint(vae):
        raise ValueError(
            f"the latent cache {root} was made with another VAE than the model's: "
            "cache the train split with the model's VAE (python -m ldm.data.latents)"
        )
    if "moments" not in cache.arrays:
        raise ValueError(f"the latent cache {root}/train holds no posterior moments")
    posterior = DiagonalGaussian(cache.arrays["moments"])
    scale = vae.scale_factor
    if scale is None:
        raise ValueError("the model's VAE has no latent scale_factor: use a trained checkpoint")
    points = vae.scale_latents(posterior.mean).flatten(1)
    std = float(posterior.var.mean().sqrt()) * scale
    groups = CaptionGroups(cache.captions)
    return EmpiricalMixture(points.float(), std, groups.groups_of(cache.captions)), groups


def use_exact_denoiser(pipeline: Pipeline, root: str | Path) -> Pipeline:
    """``pipeline`` with the exact denoiser of the latent cache at ``root`` (made with the
    same VAE) in its UNet's place, and the caption groups in its conditioner's."""
    mixture, groups = training_mixture(pipeline.vae, root)
    f, (h, w) = pipeline.vae.downsample_factor, pipeline.image_size
    size = pipeline.vae.latent_channels * (h // f) * (w // f)
    if mixture.points.shape[1] != size:
        raise ValueError(
            f"the latent cache {root} holds latents of {mixture.points.shape[1]} values, the "
            f"model samples {size} ({h}x{w} images): cache images of the model's size"
        )
    exact = ExactDenoiser(mixture, pipeline.schedule, pipeline.prediction)
    return replace(pipeline, denoiser=exact, conditioner=groups)
