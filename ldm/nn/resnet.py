"""Residual blocks and resampling of the diffusion UNet (Ho et al. 2020; Dhariwal & Nichol
2021 for the scale-shift norm). Parameter names follow the original Stable Diffusion code."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and weight dtypes, as in the
    original UNet (whose fp16 mode kept norms in fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()  # fp32: no copy
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added (or, with
    ``scale_shift``, applied as ``norm(h) * (1 + scale) + shift``) in between."""

    def __init__(
        self,
        channels: int,  # input channels
        emb_channels: int,  # width of the timestep embedding
        out_channels: int | None = None,  # output channels; None: same as input
        dropout: float = 0.0,
        scale_shift: bool = False,  # FiLM-style conditioning of the second norm
        norm_groups: int = 32,
    ):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1))
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb = self.emb_layers(emb).type(h.dtype)[..., None, None]  # (B, C or 2C, 1, 1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + emb))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
