"""The multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024).

Image patches and the conditioner's text tokens are two streams with their own weights
that meet in one joint attention over both; each stream's attention and MLP are
adaLN-Zero modulated by the timestep and pooled text embedding. The last block updates
the image stream only. The layout is that of diffusers' ``SD3Transformer2DModel`` (SD3 /
SD3-medium: no dual attention, no qk-norm), whose weights load through
``ldm.convert.diffusers_dit``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.models.denoiser import check_conditioning, run_block
from ldm.models.dit import Patches, TimestepMLP, adaln_zero_init, modulate
from ldm.nn.attention import FeedForward


class JointAttention(nn.Module):
    """One attention over the image tokens and the text tokens together; each stream has
    its own q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)
        self.context_pre_only = context_pre_only

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        n = x.shape[1]
        q = torch.cat([self.to_q(x), self.add_q_proj(c)], dim=1)
        k = torch.cat([self.to_k(x), self.add_k_proj(c)], dim=1)
        v = torch.cat([self.to_v(x), self.add_v_proj(c)], dim=1)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        x_out = self.to_out(out[:, :n])
        return x_out, (None if self.context_pre_only else self.to_add_out(out[:, n:]))


class JointBlock(nn.Module):
    """adaLN-Zero on both streams around a joint attention; with ``context_pre_only``
    (the last block) the text stream is only read: one shift and scale, no update."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, context_pre_only: bool, dropout: float
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.x_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.c_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(dim, (2 if context_pre_only else 6) * dim)
        )
        self.attn = JointAttention(dim, heads, context_pre_only, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio, dropout, activation="gelu_tanh")
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, mlp_ratio, dropout, activation="gelu_tanh")

    def forward(self, x: Tensor, c: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.x_modulation(emb).chunk(6, dim=1)
        if self.context_pre_only:
            c_scale1, c_shift1 = self.c_modulation(emb).chunk(2, dim=1)  # SD3: scale first
        else:
            c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.c_modulation(emb).chunk(
                6, dim=1
            )
        x_attn, c_attn = self.attn(
            modulate(self.norm1(x), shift1, scale1),
            modulate(self.norm1_context(c), c_shift1, c_scale1),
        )
        x = x + gate1[:, None] * x_attn
        x = x + gate2[:, None] * self.ff(modulate(self.norm2(x), shift2, scale2))
        if self.context_pre_only:
            return x, c
        c = c + c_gate1[:, None] * c_attn
        c_mlp = self.ff_context(modulate(self.norm2_context(c), c_shift2, c_scale2))
        return x, c + c_gate2[:, None] * c_mlp


class MMDiT(nn.Module):
    """``forward(x, t, context, y=None, pooled=None)`` -> a prediction shaped like x."""

    def __init__(
        self,
        *,
        in_channels: int = 16,
        sample_size: int = 128,  # latent side of training; positions are scaled to it
        patch_size: int = 2,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,  # token width of the text context
        pooled_dim: int | None = 2048,  # pooled text vector (SD3: CLIP-L + CLIP-G)
        pos_embed_max_size: int = 96,  # patches per side the position grid covers
        dropout: float = 0.0,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads")
        self.in_channels = self.out_channels = in_channels
        self.context_dim, self.pooled_dim, self.num_classes = context_dim, pooled_dim, None
        self.gradient_checkpointing = False
        self.patches = Patches(
            in_channels, hidden_size, patch_size, sample_size, max_size=pos_embed_max_size
        )
        self.time_embed = TimestepMLP(hidden_size)
        if pooled_dim is not None:
            self.pooled_emb = nn.Sequential(
                nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, i == depth - 1, dropout)
            for i in range(depth)
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (``adaln_zero_init``), both streams' modulations zeroed."""
        modulations = [m for b in self.blocks for m in (b.x_modulation[1], b.c_modulation[1])]
        adaln_zero_init(self, modulations)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """``x`` (B, C, H, W); ``t`` (B,) real-valued timesteps; ``context`` (B, N, D)
        text tokens (required); ``pooled`` (B, pooled_dim) vectors."""
        if context is None:
            raise ValueError("an MMDiT attends jointly to text tokens: context is required")
        check_conditioning(self, y, pooled)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        grid = self.patches.grid(x)
        emb = self.time_embed(t)
        if pooled is not None:
            emb = emb + self.pooled_emb(pooled.to(emb.dtype))
        emb = emb.to(x.dtype)
        h, c = self.patches(x), self.context_embedder(context.to(x.dtype))
        for block in self.blocks:
            h, c = run_block(self, block, h, c, emb)
        scale, shift = self.final_modulation(emb).chunk(2, dim=1)  # SD3: scale first
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        return self.patches.unpatchify(h, grid)
