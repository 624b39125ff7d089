"""The latent diffusion UNet (Rombach et al. 2022), written to Stable Diffusion's layout.

An encoder of resnet blocks (with spatial transformers at chosen levels) and stride-2
downsampling, a middle block, and a decoder that concatenates the encoder's skips. The
parameter names are those of the original ``openaimodel.UNetModel``, so SD 1.x / 2.x
checkpoints load by stripping ``model.diffusion_model.``; ``ldm.convert`` maps the
diffusers layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.models.denoiser import check_conditioning, run_block
from ldm.nn.attention import SpatialTransformer
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.resnet import Downsample, GroupNorm32, ResBlock, Upsample


class _Stage(nn.Sequential):
    """A run of layers that each take what they need: resnets the embedding, transformers
    the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _encoder(
    make: _Blocks, in_channels: int, ch: int, levels: list[tuple[int, int | None]], blocks: int
) -> tuple[nn.ModuleList, list[int]]:
    """The input blocks, and the channels of each skip they leave for the decoder."""
    stages, skips = nn.ModuleList([_Stage(nn.Conv2d(in_channels, ch, 3, padding=1))]), [ch]
    for level, (out, depth) in enumerate(levels):
        for _ in range(blocks):
            layers = [make.resblock(ch, out)]
            ch = out
            if depth is not None:
                layers.append(make.transformer(ch, depth))
            stages.append(_Stage(*layers))
            skips.append(ch)
        if level != len(levels) - 1:
            stages.append(_Stage(Downsample(ch)))
            skips.append(ch)
    return stages, skips


def _decoder(
    make: _Blocks, ch: int, skips: list[int], levels: list[tuple[int, int | None]], blocks: int
) -> tuple[nn.ModuleList, int]:
    """The output blocks (each takes one skip; one more block per level than the encoder),
    and their output channels."""
    stages, skips = nn.ModuleList(), list(skips)
    for level, (out, depth) in reversed(list(enumerate(levels))):
        for i in range(blocks + 1):
            layers = [make.resblock(ch + skips.pop(), out)]
            ch = out
            if depth is not None:
                layers.append(make.transformer(ch, depth))
            if level and i == blocks:
                layers.append(Upsample(ch))
            stages.append(_Stage(*layers))
    return stages, ch


class UNet(nn.Module):
    """``forward(x, t, context=None, y=None, pooled=None)`` -> a prediction shaped like x."""

    def __init__(
        self,
        *,
        in_channels: int = 4,  # latent channels in
        out_channels: int = 4,  # prediction channels out
        model_channels: int = 320,  # channels of the first level
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),  # per level, times model_channels
        blocks_per_level: int = 2,  # resnet blocks per encoder level (decoder: one more)
        attention_levels: Sequence[int] = (0, 1, 2),  # 0-based levels with transformers
        transformer_depth: int | Sequence[int] = 1,  # transformer blocks, overall or per level
        num_heads: int | None = 8,  # heads by count (SD 1.x) ...
        head_dim: int | None = None,  # ... or by channels per head (SD 2.x: 64)
        context_dim: int | None = 768,  # token width of the text context; None: no context
        linear_projection: bool = False,  # transformer projection: Linear (SD 2.x) or conv
        mid_attention: bool = True,  # a transformer in the middle block
        num_classes: int | None = None,  # class-label conditioning (y: int64 labels)
        pooled_dim: int | None = None,  # pooled-vector conditioning (e.g. a text embedding)
        scale_shift: bool = False,  # resnets condition as norm * (1 + scale) + shift
        dropout: float = 0.0,
        norm_groups: int = 32,
        positional_embedding: bool = False,  # 2-d positions on transformer tokens (not in SD)
    ):
        super().__init__()
        # The constructor arguments, for checkpoints' metadata and ldm.convert.
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["channel_multipliers"] = list(channel_multipliers)
        self.config["attention_levels"] = list(attention_levels)
        if not isinstance(transformer_depth, int):
            self.config["transformer_depth"] = list(transformer_depth)
        depths = _transformer_depths(
            transformer_depth, len(channel_multipliers), attention_levels, num_heads, head_dim
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.num_classes, self.pooled_dim = context_dim, num_classes, pooled_dim
        self.gradient_checkpointing = False
        self.model_channels = model_channels
        emb_dim = model_channels * 4
        make = _Blocks(
            emb_dim, num_heads, head_dim, context_dim, linear_projection, norm_groups, dropout,
            scale_shift, positional_embedding,
        )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        if pooled_dim is not None:
            self.pooled_emb = nn.Sequential(
                nn.Linear(pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )

        levels = [
            (model_channels * mult, depths[level] if level in attention_levels else None)
            for level, mult in enumerate(channel_multipliers)
        ]  # (channels, transformer depth or None) per level
        self.input_blocks, skips = _encoder(
            make, in_channels, model_channels, levels, blocks_per_level
        )
        ch = skips[-1]
        middle = [make.resblock(ch, ch)]
        if mid_attention:
            middle.append(make.transformer(ch, depths[-1]))
        self.middle_block = _Stage(*middle, make.resblock(ch, ch))

        self.output_blocks, ch = _decoder(make, ch, skips, levels, blocks_per_level)
        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)
        )

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
        check_conditioning(self, y, pooled)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        if pooled is not None:
            emb = emb + self.pooled_emb(pooled.to(emb.dtype))
        h, hs = x, []
        for stage in self.input_blocks:
            h = run_block(self, stage, h, emb, context)
            hs.append(h)
        h = run_block(self, self.middle_block, h, emb, context)
        for stage in self.output_blocks:
            h = run_block(self, stage, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def _transformer_depths(
    depth: int | Sequence[int],
    levels: int,
    attention_levels: Sequence[int],
    num_heads: int | None,
    head_dim: int | None,
) -> list[int]:
    """Transformer blocks per level, after checking the attention settings."""
    if (num_heads is None) == (head_dim is None):
        raise ValueError("give exactly one of num_heads (a head count) or head_dim")
    if any(not 0 <= lvl < levels for lvl in attention_levels):
        raise ValueError(f"attention_levels {list(attention_levels)} outside 0..{levels - 1}")
    depths = [depth] * levels if isinstance(depth, int) else list(depth)
    if len(depths) != levels:
        raise ValueError(f"transformer_depth needs {levels} entries, got {len(depths)}")
    return depths


@dataclass
class _Blocks:
    """The residual and transformer blocks of one UNet configuration."""

    emb_dim: int
    num_heads: int | None
    head_dim: int | None
    context_dim: int | None
    linear_projection: bool
    norm_groups: int
    dropout: float
    scale_shift: bool
    positional: bool

    def transformer(self, channels: int, depth: int) -> SpatialTransformer:
        if self.head_dim is not None:
            heads, dim = channels // self.head_dim, self.head_dim
        else:
            heads, dim = self.num_heads, channels // self.num_heads
        return SpatialTransformer(
            channels,
            heads,
            dim,
            depth,
            self.context_dim,
            self.linear_projection,
            self.norm_groups,
            self.dropout,
            positional=self.positional,
        )

    def resblock(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, self.emb_dim, cout, self.dropout, self.scale_shift, self.norm_groups)
