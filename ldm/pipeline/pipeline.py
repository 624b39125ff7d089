"""The one way to make images: a ``Pipeline`` holds what generation needs (denoiser,
conditioner, VAE, schedule, prediction type, image size) and ``generate`` turns captions,
labels or a count into images, each from its own seed.

It is a plain object, not a LightningModule: sample.py, evaluate.py, the sample-grid and
FID callbacks, DreamBooth's class images and the server all call it; the training module
hands out one over its sampling weights (``LatentDiffusion.pipeline``).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.diffusion.guidance import Conditioning, cfg
from ldm.diffusion.samplers import Callback
from ldm.diffusion.schedules import Schedule
from ldm.io import WeightsFileError
from ldm.pipeline.checkpoint import Checkpoint, open_checkpoint
from ldm.seeding import stable_seed

Inputs = Sequence[str] | Tensor | int  # captions, class labels, or a count (unconditional)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)


def precision_dtype(precision: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` (or a dtype) as a torch dtype."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


@dataclass
class Pipeline:
    """Noise to images. ``denoiser(x_t, t, **conditioning)`` (a UNet, DiT or MMDiT)
    predicts ``prediction`` (eps, x0, v, flow or edm) under ``schedule``; ``conditioner``
    (None: unconditional) turns inputs into that conditioning; ``vae`` (None: pixel-space
    diffusion) decodes its scaled latents."""

    denoiser: nn.Module
    conditioner: nn.Module | None
    vae: nn.Module | None
    schedule: Schedule
    prediction: str = "eps"
    image_size: tuple[int, int] = (32, 32)
    _vae_fp32: nn.Module | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path | Checkpoint,
        *,
        ema: bool = True,  # the EMA weights when the checkpoint kept them
        conditioner: nn.Module | None = None,  # SD files / diffusers folders: the text tower
        schedule: Schedule | None = None,  # SD files / diffusers folders (ours carry theirs)
        prediction: str = "eps",  # the same
        image_size: int | Sequence[int] | None = None,  # default: ours' training size, or 512
    ) -> Pipeline:
        """The pipeline of any checkpoint ``open_checkpoint`` reads, in eval mode."""
        checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        if checkpoint.format == "ours" and checkpoint.task != "ldm":
            raise WeightsFileError(
                f"{checkpoint.path} is a {checkpoint.task} checkpoint; sampling needs a "
                "diffusion one"
            )
        vae = checkpoint.vae()
        if vae is None and checkpoint.format != "ours":
            raise WeightsFileError(f"{checkpoint.path} holds no VAE; sampling needs one")
        schedule = checkpoint.schedule() or schedule
        if schedule is None:
            raise ValueError(f"{checkpoint.path} does not say its noise schedule: give one")
        size = image_size or checkpoint.image_size or 512
        return cls(
            checkpoint.denoiser(ema),
            checkpoint.conditioner(ema, given=conditioner),
            vae,
            schedule,
            checkpoint.prediction or prediction,
            (size, size) if isinstance(size, int) else (int(size[0]), int(size[1])),
        ).eval()

    def swap_vae(self, vae: nn.Module) -> Pipeline:
        """Decode with ``vae`` instead (a decoder fine-tuned for the same latents, as SD's
        vae-ft-mse): it takes the model's latent scale and shift, and must have its latent
        channels and downsampling factor."""
        if self.vae is None:
            raise ValueError("this model diffuses pixels: it has no VAE to replace")
        ours = (self.vae.latent_channels, self.vae.downsample_factor)
        if (vae.latent_channels, vae.downsample_factor) != ours:
            raise ValueError(
                f"the replacement VAE makes {vae.latent_channels}-channel latents at "
                f"f = {vae.downsample_factor}; this model's are {ours[0]}-channel at "
                f"f = {ours[1]}: give a VAE of the model's latent space"
            )
        vae.scale_factor, vae.shift_factor = self.vae.scale_factor, self.vae.shift_factor
        self.vae = vae.to(self.device, _dtype_of(self.vae)).eval()
        self._vae_fp32 = None
        return self

    @property
    def device(self) -> torch.device:
        """Where its weights are (an exact denoiser has none: then the VAE's)."""
        for module in self.modules():
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                return tensor.device
        return torch.device("cpu")

    def networks(self) -> nn.ModuleDict:
        """The denoiser and the conditioner, by name: where adapters and embeddings go."""
        parts = {"denoiser": self.denoiser, "conditioner": self.conditioner}
        return nn.ModuleDict({k: m for k, m in parts.items() if m is not None})

    def modules(self) -> list[nn.Module]:
        """Every network it holds (the VAE too)."""
        return [*self.networks().values(), *([self.vae] if self.vae is not None else [])]

    @property
    def dtype(self) -> torch.dtype:
        """What the networks compute in (their weights' dtype; see ``to``)."""
        for module in self.modules():
            if (dtype := _dtype_of(module)) is not None:
                return dtype
        return torch.float32

    def to(
        self, device: torch.device | str | None = None, dtype: str | torch.dtype | None = None
    ) -> Pipeline:
        """Moves its networks (in place) to ``device`` and, with ``dtype`` (``bf16``,
        ``fp16``, ``fp32`` or a torch dtype), casts their weights: the networks then compute
        in it while the sampler integrates in fp32. Returns itself."""
        cast = None if dtype is None else precision_dtype(dtype)
        for module in self.modules():
            module.to(device=device, dtype=cast)
        self._vae_fp32 = None
        return self

    def eval(self) -> Pipeline:
        for module in self.modules():
            module.eval()
        return self

    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of what the sampler integrates: latents, or pixels without a VAE."""
        height, width = self.image_size
        if self.vae is None:
            return (self.denoiser.in_channels, height, width)
        f = self.vae.downsample_factor
        return (self.vae.latent_channels, height // f, width // f)

    def condition(self, inputs: Sequence[str] | Tensor) -> Conditioning:
        """The denoiser's conditioning of captions or labels."""
        if self.conditioner is None:
            raise ValueError("this pipeline is unconditional: give a count, not captions")
        return self.conditioner(inputs)

    @torch.no_grad()
    def generate(
        self,
        inputs: Inputs,
        sampler: Callable[..., Tensor],  # a sampler with its options bound (make_sampler)
        *,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        negative: Sequence[str] | None = None,  # per-sample negative prompts (default: "")
        seeds: Sequence[int] | None = None,  # one per sample: its starting noise
        generator: torch.Generator | Sequence[torch.Generator] | None = None,  # sampler noise
        decode: bool = True,  # False: the sampled latents, as the diffusion model sees them
        callback: Callback | None = None,  # called by the sampler after every step
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] (or latents). Sample i starts from noise seeded by
        ``seeds[i]`` (default i), so it does not depend on what else is in the batch; give
        one ``generator`` per sample for stochastic samplers' step noise too
        (``step_generators(seeds)``). Guidance pushes away from ``negative[i]`` instead of
        the empty caption when given."""
        count = inputs if isinstance(inputs, int) else len(inputs)
        seeds = list(range(count)) if seeds is None else list(seeds)
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} samples")
        shape = self.latent_shape()
        x_T = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(self.device)
        model: Callable[[Tensor, Tensor], Tensor] = self.denoiser
        if getattr(self.denoiser, "out_channels", shape[0]) != shape[0]:
            model = _MeanOnly(self.denoiser, shape[0])  # a DiT's learned variance: unused
        if (dtype := _dtype_of(self.denoiser)) not in (None, torch.float32):
            model = _InDtype(model, dtype)
        if self.conditioner is not None and not isinstance(inputs, int):
            cond = self.condition(inputs)
            if negative is not None and len(negative) != count:
                raise ValueError(f"{len(negative)} negative prompts for {count} samples")
            uncond = self.condition(negative) if negative else self.conditioner.empty(1)
            model = cfg(model, cond, uncond, guidance_scale, rescale=guidance_rescale)
        options = {"callback": callback} if callback is not None else {}
        z = sampler(
            model, x_T, self.schedule, prediction=self.prediction, generator=generator, **options
        )
        if not decode:
            return z
        if self.vae is None:
            return z.clamp(-1, 1)
        return self.decode(z).clamp(-1, 1)

    def decode(self, z: Tensor) -> Tensor:
        """The VAE's fp32 images of sampled latents ``z``. A VAE in bf16 / fp16 that returns
        a non-finite value (fp16 overflows in SD's decoder) decodes that batch again in
        fp32, from an fp32 copy of its weights kept for the purpose (a warning says so)."""
        vae, latents = self.vae, self.vae.unscale_latents(z)
        dtype = _dtype_of(vae)
        if dtype in (None, torch.float32):
            return vae.decode(latents)
        images = vae.decode(latents.to(dtype)).float()
        if bool(torch.isfinite(images).all()):
            return images
        if self._vae_fp32 is None:
            log.warning("the %s VAE decoded non-finite values: decoding again in fp32", dtype)
            self._vae_fp32 = copy.deepcopy(vae).float()
        return self._vae_fp32.decode(latents.float())


class _MeanOnly(nn.Module):
    """The first ``channels`` of a denoiser's output: the prediction without the variance
    channels of a learned-sigma DiT (Nichol & Dhariwal 2021), which no sampler here uses."""

    def __init__(self, denoiser: nn.Module, channels: int):
        super().__init__()
        self.denoiser, self.channels = denoiser, channels

    def forward(self, x: Tensor, t: Tensor, **conditioning: Tensor) -> Tensor:
        return self.denoiser(x, t, **conditioning)[:, : self.channels]


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s floating-point weights (None: it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class _InDtype(nn.Module):
    """A denoiser with low-precision weights between fp32 samplers: its inputs cast to
    ``dtype`` on the way in (timesteps stay fp32), its prediction to fp32 on the way out."""

    def __init__(self, denoiser: Callable[..., Tensor], dtype: torch.dtype):
        super().__init__()
        self.denoiser, self.dtype = denoiser, dtype

    def forward(self, x: Tensor, t: Tensor, **conditioning: Tensor) -> Tensor:
        cast = {
            k: v.to(self.dtype) if v.is_floating_point() else v for k, v in conditioning.items()
        }
        return self.denoiser(x.to(self.dtype), t, **cast).float()


def step_generators(
    seeds: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample for a stochastic sampler's step noise, seeded from the
    sample's seed: sample.py and the server make the same image from the same seed."""
    return [torch.Generator(device).manual_seed(stable_seed(s, "sampler noise")) for s in seeds]
