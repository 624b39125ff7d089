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
