"""Diffusion transformers: DiT (Peebles & Xie 2023), adaLN-Zero blocks over latent patches.

The latent is cut into ``patch_size``-square patches, each a token with fixed 2-d
sine-cosine positions; every block modulates a pre-LayerNorm self-attention and MLP with a
shift, scale and gate regressed from the conditioning vector (timestep + class label +
pooled text), the gates starting at zero so each block starts as the identity. For text,
a block also cross-attends to the conditioner's tokens (``context_dim``; as diffusers'
``BasicTransformerBlock`` does it, without modulation). The layout and the few numerical
conventions (timestep frequencies, the MLP's LayerNorm epsilon) are those of diffusers'
``DiTTransformer2DModel``, so its weights load through ``ldm.convert.diffusers_dit``.
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

from ldm.models.denoiser import check_conditioning, run_block
from ldm.nn.attention import CrossAttention, FeedForward
from ldm.nn.embeddings import patch_positions, timestep_embedding

# The paper's Table 1 (depth, hidden size, heads); DiT-XL/2 on ImageNet 256 is 675M.
DIT_PRESETS = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
TIME_CHANNELS = 256  # sinusoidal timestep features before the MLP (DiT, SD3)


def adaln_zero_init(
    model: nn.Module, modulations: list[nn.Linear], embeddings: list[nn.Module] = ()
) -> None:
    """DiT's initialisation of ``model`` (a DiT or MMDiT): Xavier-uniform linears (the patch
    conv as one), N(0, 0.02) timestep MLP and ``embeddings``, and zeros on the blocks'
    ``modulations``, the final modulation and the output: every block starts as the
    identity (adaLN-Zero)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = model.patches.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(model.patches.proj.bias)
    for layer in (model.time_embed[0], model.time_embed[2], *embeddings):
        nn.init.normal_(layer.weight, std=0.02)
    for layer in [*modulations, model.final_modulation[1], model.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift``, one (B, D) shift and scale per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepMLP(nn.Sequential):
    """Sinusoidal features of ``t`` through Linear-SiLU-Linear (DiT's ``t_embedder``)."""

    def __init__(self, dim: int, freq_shift: int = 0):
        super().__init__(nn.Linear(TIME_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq_shift = freq_shift

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, TIME_CHANNELS, freq_shift=self.freq_shift)
        return super().forward(features.to(self[0].weight.dtype))


class Patches(nn.Module):
    """Patchify (a strided conv + fixed positions) and unpatchify of (B, C, H, W) latents."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch_size: int,
        sample_size: int,
        max_size: int | None = None,  # SD3: positions cropped from a max_size-square grid
    ):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.base_size, self.max_size = sample_size // patch_size, max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self._positions: dict[tuple, Tensor] = {}  # by grid, device and dtype

    def grid(self, x: Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latents of {h}x{w} do not split into {p}x{p} patches")
        return h // p, w // p

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, dim) tokens, positions added."""
        grid = self.grid(x)
        tokens = rearrange(self.proj(x), "b c h w -> b (h w) c")
        key = (grid, tokens.device, tokens.dtype)
        if key not in self._positions:
            table = patch_positions(*grid, self.dim, self.base_size, self.max_size)
            self._positions[key] = table.to(tokens)
        return tokens + self._positions[key]

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, h * w, p * p * C) -> (B, C, h * p, w * p)."""
        p = self.patch_size
        return rearrange(
            tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p
        )


class DiTBlock(nn.Module):
    """adaLN-Zero: ``x += gate * attn(modulate(norm x))``, the same for the MLP; with a
    context, an unmodulated cross-attention (LayerNorm, residual) between the two."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        context_dim: int | None,
        mlp_norm_eps: float,
        dropout: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = CrossAttention(dim, None, heads, dim // heads, dropout, bias=True)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
            self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads, dropout, bias=True)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.ff = FeedForward(dim, mlp_ratio, dropout, activation="gelu_tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn1(modulate(self.norm1(x), shift1, scale1))
        if context is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + gate2[:, None] * self.ff(modulate(self.norm3(x), shift2, scale2))


class DiT(nn.Module):
    """``forward(x, t, context=None, y=None, pooled=None)`` -> a prediction shaped like x
    (with ``learn_sigma``: twice its channels, the second half the variance interpolation
    of Nichol & Dhariwal 2021)."""

    def __init__(
        self,
        *,
        in_channels: int = 4,
        sample_size: int = 32,  # latent side the positions are laid out for
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,  # class-label rows (y), the null class included
        context_dim: int | None = None,  # token width of a text context: cross-attention
        pooled_dim: int | None = None,  # pooled-vector conditioning (a text embedding)
        learn_sigma: bool = False,  # also predict the variance (out channels doubled)
        time_freq_shift: int = 1,  # diffusers' DiT timestep frequencies (original DiT: 0)
        mlp_norm_eps: float = 1e-5,  # diffusers' DiT (original DiT: 1e-6)
        dropout: float = 0.0,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} even heads")
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.context_dim, self.num_classes, self.pooled_dim = context_dim, num_classes, pooled_dim
        self.gradient_checkpointing = False
        self.patches = Patches(in_channels, hidden_size, patch_size, sample_size)
        self.time_embed = TimestepMLP(hidden_size, time_freq_shift)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, hidden_size)
        if pooled_dim is not None:
            self.pooled_emb = nn.Sequential(
                nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, mlp_norm_eps, dropout)
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (``adaln_zero_init``), the label table N(0, 0.02)."""
        embeddings = [self.label_emb] if self.num_classes is not None else []
        adaln_zero_init(self, [b.adaLN_modulation[1] for b in self.blocks], embeddings)

    def conditioning(self, t: Tensor, y: Tensor | None, pooled: Tensor | None) -> Tensor:
        """The (B, hidden) vector every block is modulated by."""
        check_conditioning(self, y, pooled)
        c = self.time_embed(t)
        if y is not None:
            c = c + self.label_emb(y)
        if pooled is not None:
            c = c + self.pooled_emb(pooled.to(c.dtype))
        return c

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """``x`` (B, C, H, W); ``t`` (B,) real-valued timesteps; ``context`` (B, N, D)
        tokens; ``y`` (B,) class labels; ``pooled`` (B, pooled_dim) vectors."""
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                "a context is required exactly when the DiT has context_dim "
                f"(context_dim={self.context_dim}, context given: {context is not None})"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        grid = self.patches.grid(x)
        c = self.conditioning(t, y, pooled).to(x.dtype)
        h = self.patches(x)
        for block in self.blocks:
            h = run_block(self, block, h, c, context)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        return self.patches.unpatchify(h, grid)


def dit_preset(name: str, **overrides: object) -> DiT:
    """``DiT-XL/2``-style names: a size of DIT_PRESETS and a patch size."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_PRESETS or not patch.isdigit():
        raise ValueError(f"unknown DiT preset {name!r}; use DiT-<S|B|L|XL>/<patch>, e.g. DiT-XL/2")
    depth, hidden, heads = DIT_PRESETS[size]
    kwargs: dict[str, object] = dict(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch)
    )
    return DiT(**(kwargs | overrides))


def parameter_count(model: nn.Module, exclude: Sequence[str] = ()) -> int:
    """Parameters of ``model``, leaving out those whose names start with ``exclude``."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(tuple(exclude)))
