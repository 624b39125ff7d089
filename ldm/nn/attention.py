"""Attention blocks of the Stable Diffusion UNet, on ``scaled_dot_product_attention``.

``SpatialTransformer`` (Rombach et al. 2022): GroupNorm, a conv or linear projection in,
``depth`` transformer blocks (self-attention, cross-attention to a context, GEGLU
feed-forward of Shazeer 2020, each pre-LayerNorm with a residual), a projection out and a
residual. Parameter names follow the original code (``attn1``, ``attn2``, ``ff.net``).
Optionally the tokens get fixed 2-d sine-cosine positions (``positional``, as in DiT;
no parameters), which small latents need to learn where a caption puts things.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.embeddings import grid_embedding


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (to itself when ``context`` is None)."""

    def __init__(
        self,
        query_dim: int,  # channels of x
        context_dim: int | None = None,  # channels of the context; None: self-attention
        heads: int = 8,  # number of heads
        head_dim: int = 64,  # channels per head
        dropout: float = 0.0,  # on the output projection
        bias: bool = False,  # biases on q, k, v (SD: none; DiT: yes)
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """``a * gelu(b)`` of one projection split in two (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class GELU(nn.Module):
    """``gelu(proj(x))``, tanh-approximated (DiT's MLP; the ``proj`` name is diffusers')."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """A feed-forward ``mult`` times wider inside: GEGLU (SD) or tanh-GELU (DiT, MMDiT)."""

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0, activation: str = "geglu"):
        super().__init__()
        inner = int(dim * mult)
        if activation not in ("geglu", "gelu_tanh"):
            raise ValueError(f"activation must be geglu or gelu_tanh, got {activation!r}")
        act = GEGLU(dim, inner) if activation == "geglu" else GELU(dim, inner)
        self.net = nn.Sequential(act, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-norm with a residual."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token context."""

    def __init__(
        self,
        channels: int,  # channels of the feature map
        heads: int,  # attention heads
        head_dim: int,  # channels per head; heads * head_dim is the transformer width
        depth: int = 1,  # transformer blocks
        context_dim: int | None = None,  # token width of the context; None: self-attention
        linear_projection: bool = False,  # Linear (SD 2.x) or 1x1 Conv (SD 1.x) in / out
        norm_groups: int = 32,
        dropout: float = 0.0,
        positional: bool = False,  # add fixed 2-d sine-cosine positions to the tokens
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection, self.positional = linear_projection, positional
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        projection = nn.Linear if linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = projection(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = projection(inner, channels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        _, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.linear_projection:
            x = self.proj_in(x)
        if self.positional:  # where each token is: cross-attention can place what it reads
            x = x + grid_embedding(h, w, x.shape[-1]).to(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)  # a channels-last view
        if not self.linear_projection:
            x = self.proj_out(x)
        # the residual first: the sum takes its layout, so the feature map leaves in the
        # layout it came in (a channels-last view here would switch every later convolution
        # to NHWC, each copying its weights to match)
        return residual + x
