"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, appendix G).

A convolutional encoder maps an image to the mean and log-variance of a diagonal Gaussian
over latents ``2^(levels - 1)`` times smaller per side; a mirrored decoder maps latents
back. Parameter names are those of the original ``ldm.models.autoencoder.AutoencoderKL``,
so Stable Diffusion's ``first_stage_model.*`` weights load as they are; ``ldm.convert``
maps the diffusers layout.

The latent diffusion model works on ``(z - shift_factor) * scale_factor`` (unit variance
for SD's VAE with 0.18215); those two numbers are attributes of the VAE, set by its config
or computed from data, and written into its config for checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.autoencoder_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm

SD_VAE_SCALE = 0.18215  # the latent scale of Stable Diffusion 1.x / 2.x's VAE
LOGVAR_RANGE = (-30.0, 20.0)  # the original's clamp: keeps exp(logvar) finite in fp32


class DiagonalGaussian:
    """A diagonal Gaussian over latents from ``moments`` (B, 2C, h, w): mean, then log-variance."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * noise``; the noise comes from ``generator`` when given."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample (B,), summed over latent dims; ``other`` = N(0, I)."""
        if other is None:
            terms = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).square() / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: Tensor) -> Tensor:
        """Negative log-likelihood of ``sample`` per sample (B,), summed over latent dims."""
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).square() / self.var
        return 0.5 * terms.sum(dim=(1, 2, 3))


class _Level(nn.Module):
    """One resolution level: ``block`` (resnets), ``attn`` (after each resnet, or none) and a
    resampler (``downsample`` / ``upsample``) unless it is the coarsest level."""

    def __init__(
        self,
        blocks: list[ResnetBlock],
        attention: bool,
        groups: int,
        *,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        width = blocks[-1].conv2.out_channels
        self.attn = nn.ModuleList(AttnBlock(width, groups) for _ in blocks) if attention else None
        self.downsample = Downsample(width) if downsample else None
        self.upsample = Upsample(width) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if self.attn is not None:
                x = self.attn[index](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class _Mid(nn.Module):
    """Resnet, self-attention (optional), resnet at the coarsest level."""

    def __init__(self, channels: int, attention: bool, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run(module: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    if checkpointed and module.training and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> Gaussian moments (B, 2 * latent, H / f, W / f)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        blocks_per_level: int,
        attention_levels: Sequence[int],
        mid_attention: bool,
        latent_channels: int,
        dropout: float,
        groups: int,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = base_channels
        for level, mult in enumerate(channel_multipliers):
            out = base_channels * mult
            blocks = [
                ResnetBlock(ch if i == 0 else out, out, dropout, groups)
                for i in range(blocks_per_level)
            ]
            last = level == len(channel_multipliers) - 1
            self.down.append(_Level(blocks, level in attention_levels, groups, downsample=not last))
            ch = out
        self.mid = _Mid(ch, mid_attention, dropout, groups)
        self.norm_out = group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in [*self.down, self.mid]:
            h = _run(stage, h, self.gradient_checkpointing)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B, out, h * f, w * f)."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        blocks_per_level: int,
        attention_levels: Sequence[int],
        mid_attention: bool,
        latent_channels: int,
        dropout: float,
        groups: int,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        ch = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, mid_attention, dropout, groups)
        levels: list[_Level] = []
        for level in reversed(range(len(channel_multipliers))):
            out = base_channels * channel_multipliers[level]
            blocks = [
                ResnetBlock(ch if i == 0 else out, out, dropout, groups)
                for i in range(blocks_per_level + 1)
            ]
            stage = _Level(blocks, level in attention_levels, groups, upsample=level != 0)
            levels.insert(0, stage)  # up[0] is the finest level, as in the original
            ch = out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for stage in [self.mid, *reversed(self.up)]:
            h = _run(stage, h, self.gradient_checkpointing)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``; ``scale_latents`` /
    ``unscale_latents`` map between the VAE's latents and the diffusion model's."""

    def __init__(
        self,
        *,
        in_channels: int = 3,  # image channels in
        out_channels: int = 3,  # image channels out
        base_channels: int = 128,  # channels of the finest level
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),  # per level; f = 2^(levels - 1)
        blocks_per_level: int = 2,  # resnets per encoder level (decoder: one more)
        attention_levels: Sequence[int] = (),  # 0-based levels with self-attention (SD: none)
        mid_attention: bool = True,  # self-attention in the middle blocks
        latent_channels: int = 4,  # channels of z
        quant_conv: bool = True,  # 1x1 convs on the moments and on z (SD: yes; SD3 / FLUX: no)
        dropout: float = 0.0,
        norm_groups: int = 32,
        scale_factor: float | None = None,  # latent scale; None until computed from data
        shift_factor: float = 0.0,  # latent shift, subtracted before scaling
    ):
        super().__init__()
        # The constructor arguments, for checkpoints' metadata and ldm.convert.
        self.config: dict[str, Any] = {
            k: v for k, v in locals().items() if k not in ("self", "__class__")
        }
        self.config["channel_multipliers"] = list(channel_multipliers)
        self.config["attention_levels"] = list(attention_levels)
        levels = len(channel_multipliers)
        if levels < 1:
            raise ValueError("channel_multipliers needs at least one level")
        if any(not 0 <= lvl < levels for lvl in attention_levels):
            raise ValueError(f"attention_levels {list(attention_levels)} outside 0..{levels - 1}")
        widths = [base_channels * m for m in channel_multipliers]
        if any(w % norm_groups for w in widths):
            raise ValueError(
                f"level widths {widths} must be multiples of norm_groups={norm_groups}"
            )
        trunk = dict(
            base_channels=base_channels,
            channel_multipliers=list(channel_multipliers),
            blocks_per_level=blocks_per_level,
            attention_levels=list(attention_levels),
            mid_attention=mid_attention,
            latent_channels=latent_channels,
            dropout=dropout,
            groups=norm_groups,
        )
        self.encoder = Encoder(in_channels, **trunk)
        self.decoder = Decoder(out_channels, **trunk)
        self.quant_conv = (
            nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant_conv else None
        )
        self.post_quant_conv = (
            nn.Conv2d(latent_channels, latent_channels, 1) if quant_conv else None
        )
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (levels - 1)

    # ----------------------------------------------------------------- latent scale

    @property
    def scale_factor(self) -> float | None:
        return self.config["scale_factor"]

    @scale_factor.setter
    def scale_factor(self, value: float | None) -> None:
        self.config["scale_factor"] = None if value is None else float(value)

    @property
    def shift_factor(self) -> float:
        return self.config["shift_factor"]

    @shift_factor.setter
    def shift_factor(self, value: float) -> None:
        self.config["shift_factor"] = float(value)

    def _scale(self) -> float:
        if self.scale_factor is None:
            raise ValueError(
                "this VAE has no latent scale_factor yet: set it in its config (SD's VAE: "
                "0.18215), or compute it from data as 1 / std of the latents"
            )
        return self.scale_factor

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> the diffusion model's: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self._scale()

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> VAE latents: ``z / scale + shift``."""
        return z / self._scale() + self.shift_factor

    # ----------------------------------------------------------------- encode / decode

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = value

    def _moments(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(
        self, x: Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> the posterior over latents (B, latent, H/f, W/f).

        With ``tile_size`` (image pixels) large images are encoded in overlapping tiles
        blended linearly over ``tile_overlap`` pixels (default a quarter tile): memory stays
        bounded, at the price of per-tile normalisation and attention (an approximation).
        """
        if tile_size is None:
            return DiagonalGaussian(self._moments(x))
        f = self.downsample_factor
        return DiagonalGaussian(tiled(self._moments, x, tile_size, tile_overlap, 1, f, f))

    def decode(
        self, z: Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> Tensor:
        """Latents (B, latent, h, w) -> images (B, C, h*f, w*f); tiles as in ``encode``, with
        ``tile_size`` and ``tile_overlap`` in image pixels."""
        if tile_size is None:
            return self._decode(z)
        f = self.downsample_factor
        for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap or 0)):
            if value % f:
                raise ValueError(f"{name} {value} must be a multiple of {f} (image pixels)")
        overlap = None if tile_overlap is None else tile_overlap // f
        return tiled(self._decode, z, tile_size // f, overlap, f, 1, 1)

    def forward(
        self, x: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of ``x`` through a sampled (or, with ``sample=False``, the mean)
        latent, and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering ``size``: every ``stride``, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, overlap: int, before: bool, after: bool, like: Tensor) -> Tensor:
    """1-D blending weights of a tile: rising over ``overlap`` where a tile lies before it,
    falling where one lies after; strictly positive everywhere."""
    i = torch.arange(length, dtype=like.dtype, device=like.device) + 0.5
    weight = torch.ones(length, dtype=like.dtype, device=like.device)
    if overlap > 0 and before:
        weight = torch.minimum(weight, i / overlap)
    if overlap > 0 and after:
        weight = torch.minimum(weight, (length - i) / overlap)
    return weight


def tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int | None,
    up: int,
    down: int,
    multiple: int,
) -> Tensor:
    """``fn`` applied to overlapping ``tile`` x ``tile`` windows of ``x`` and blended.

    ``fn`` maps (B, C, h, w) to (B, C', h * up / down, w * up / down); neighbouring outputs
    are averaged with linear ramps over the overlap, so a pointwise ``fn`` gives exactly
    ``fn(x)``. ``tile``, ``overlap`` and the size of ``x`` must be multiples of ``multiple``
    (the encoder's downsampling factor) so that tiles fall on the latent grid.
    """
    overlap = tile // 4 // multiple * multiple if overlap is None else overlap
    _, _, height, width = x.shape
    for name, value in (("tile_size", tile), ("tile_overlap", overlap)):
        if value % multiple or value < 0:
            raise ValueError(f"{name} {value} must be a non-negative multiple of {multiple}")
    if height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} must be a multiple of {multiple} to tile")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap {overlap} must be smaller than tile_size {tile}")
    out = weights = None
    rows, cols = _starts(height, tile, tile - overlap), _starts(width, tile, tile - overlap)
    ramp = overlap * up // down
    for r, top in enumerate(rows):
        for c, left in enumerate(cols):
            piece = fn(x[:, :, top : top + tile, left : left + tile])  # (B, C', th, tw)
            if out is None:
                shape = (x.shape[0], piece.shape[1], height * up // down, width * up // down)
                out = piece.new_zeros(shape)
                weights = piece.new_zeros(shape[2:])
            th, tw = piece.shape[2:]
            w = _ramp(th, ramp, r > 0, r < len(rows) - 1, piece)[:, None] * _ramp(
                tw, ramp, c > 0, c < len(cols) - 1, piece
            )  # (th, tw)
            y, x0 = top * up // down, left * up // down
            out[:, :, y : y + th, x0 : x0 + tw] += piece * w
            weights[y : y + th, x0 : x0 + tw] += w
    return out / weights
