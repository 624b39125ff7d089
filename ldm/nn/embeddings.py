"""Sinusoidal timestep embedding (Vaswani et al. 2017; as in DDPM and Stable Diffusion)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0
) -> Tensor:
    """``[cos(t f), sin(t f)]`` with ``f = max_period^(-i / (half - freq_shift))``: (B,) ->
    (B, dim), float32. ``freq_shift=1`` is diffusers' DiT spacing (the UNet, SD3: 0).

    Real-valued ``t`` is fine (fractional timesteps of Karras samplers).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def grid_embedding(height: int, width: int, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed 2-d sine-cosine positions of a ``height x width`` grid (MAE / DiT's 2-d
    embedding): (height * width, dim), the first half of the channels from the row, the
    second from the column, in row-major order. Coordinates are cell centres as fractions
    of the side (times 64), so a place in the image gets the same code at every resolution."""
    if dim % 4:
        raise ValueError(f"a 2-d positional embedding needs dim divisible by 4, got {dim}")
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 64
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 64
    y, x = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    quarter = dim // 4
    freqs = max_period ** (-torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(position: Tensor) -> Tensor:
        args = position.reshape(-1, 1) * freqs[None]  # (HW, dim / 4)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    return torch.cat([axis(y), axis(x)], dim=-1).float()  # (HW, dim)


def patch_positions(
    height: int, width: int, dim: int, base_size: int, max_size: int | None = None
) -> Tensor:
    """Fixed 2-d sine-cosine positions of a ``height x width`` patch grid as DiT and SD3
    give them (MAE's ``get_2d_sincos_pos_embed``, diffusers' ``PatchEmbed``): (height *
    width, dim), row-major; the first half of the channels encodes the column, the second
    the row, each as ``[sin, cos]``. Index ``i`` of a side of ``n`` patches sits at ``i *
    base_size / n``; with ``max_size`` (SD3) the grid is the centre crop of a
    ``max_size``-square one."""
    if dim % 4:
        raise ValueError(f"a 2-d positional embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def side(n: int) -> Tensor:
        if max_size is None:
            return torch.arange(n, dtype=torch.float32) / (n / base_size)
        if n > max_size:
            raise ValueError(f"{n} patches on a side; the positions go up to max_size={max_size}")
        start = (max_size - n) // 2
        return (torch.arange(max_size, dtype=torch.float32) / (max_size / base_size))[
            start : start + n
        ]

    def axis(position: Tensor) -> Tensor:
        args = position.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    y, x = torch.meshgrid(side(height), side(width), indexing="ij")
    return torch.cat([axis(x), axis(y)], dim=-1).float()
