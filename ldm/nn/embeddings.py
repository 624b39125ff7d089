"""Sinusoidal timestep embedding (Vaswani et al. 2017; as in DDPM and Stable Diffusion)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[cos(t f), sin(t f)]`` with ``f = max_period^(-i / half)``: (B,) -> (B, dim), float32.

    Real-valued ``t`` is fine (fractional timesteps of Karras samplers).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
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
