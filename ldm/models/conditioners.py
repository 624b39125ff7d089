"""Conditioners: captions and class labels turned into the UNet's conditioning inputs.

* ``OpenCLIPTextEncoder``: a frozen text tower of CLIP (Radford et al. 2021) as trained by
  OpenCLIP (Cherti et al. 2023), read at its last or penultimate layer; Stable Diffusion 2.x
  uses ViT-H-14's penultimate layer.
* ``TransformerTextEncoder``: a small bidirectional transformer trained from scratch with the
  UNet, the choice of the LDM paper's own text-to-image model (Rombach et al. 2022), here on
  CLIP's BPE tokenizer so tokenization works offline.
* ``ClassEmbedder``: a class-label table with a reserved null class (Rombach et al. 2022).

Every conditioner maps a batch to a dict whose keys are among ``context``, ``y`` and
``pooled``, the keyword arguments of ``UNet.forward``, so ``unet(x, t, **cond)`` and
``cfg(unet, cond, uncond, scale)`` take it as it is. ``empty(batch_size)`` is the
unconditional input of classifier-free guidance (Ho & Salimans 2022), and
``forward(batch, drop_prob=p)`` swaps each sample's input for the empty one with probability
``p`` (caption / label dropout while training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.diffusion.guidance import Conditioning
from ldm.nn.attention import FeedForward

_Batch = TypeVar("_Batch", Tensor, Sequence[str])


def drop_conditioning(
    inputs: _Batch,
    p: float,
    empty: str | int,
    generator: torch.Generator | None = None,
    dropped: Tensor | None = None,
) -> _Batch:
    """Replace each sample of ``inputs`` (captions, or a label tensor) by ``empty`` with
    probability ``p``; ``p = 0`` keeps every sample and ``p = 1`` drops every one, exactly.
    ``dropped``, a (B,) bool mask, names the samples to drop instead of drawing them."""
    if not 0 <= p <= 1:
        raise ValueError(f"conditioning drop probability must be in [0, 1], got {p}")
    if dropped is None:
        device = generator.device if generator is not None else "cpu"
        # rand is in [0, 1): `< 0` never holds and `< 1` always does.
        dropped = torch.rand(len(inputs), generator=generator, device=device) < p
    elif dropped.shape != (len(inputs),):
        raise ValueError(f"dropped mask {tuple(dropped.shape)} does not fit {len(inputs)} samples")
    if isinstance(inputs, Tensor):
        return torch.where(dropped.to(inputs.device), torch.full_like(inputs, empty), inputs)
    return [empty if drop else text for text, drop in zip(inputs, dropped.tolist(), strict=True)]


def _check_captions(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"pass a list of captions, got a single string {texts[:40]!r}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"caption {index} of the batch is {text!r}, not a string; "
                'give every sample a caption ("" for none)'
            )
    return list(texts)


class _TextConditioner(nn.Module):
    """Captions -> ``{"context": (B, L, width)}`` (plus ``"pooled"`` when asked for).

    Subclasses set ``tokenizer``, ``max_length`` and ``output_pooled`` and implement
    ``encode_tokens``.
    """

    input_key = "caption"  # what it reads from a data batch
    tokenizer: Any  # open_clip's SimpleTokenizer: list[str] -> (B, max_length) int64
    max_length: int
    output_pooled: bool

    def encode_tokens(self, tokens: Tensor, pooled: bool = True) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, L) -> per-token states (B, L, width) and, if asked, pooled (B, P)."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """CLIP BPE ids (B, max_length), int64: SOT, the caption, EOT, zero padding; captions
        longer than ``max_length`` are cut and end in EOT."""
        return self.tokenizer(_check_captions(texts), context_length=self.max_length)

    def token_count(self, text: str) -> int:
        """The tokens ``text`` takes, SOT and EOT included (over ``max_length``: cut)."""
        return len(self.tokenizer.encode(text)) + 2

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> token states (B, max_length, width) and pooled vectors (B, P)."""
        device = next(self.parameters()).device
        return self.encode_tokens(self.tokenize(texts).to(device), pooled=True)

    def forward(
        self,
        texts: Sequence[str],
        *,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
        dropped: Tensor | None = None,
    ) -> Conditioning:
        """``{"context": (B, max_length, width)}``, with ``"pooled"`` if built with
        ``pooled=True``; each caption becomes "" with probability ``drop_prob`` first (or
        where the bool mask ``dropped`` says)."""
        texts = drop_conditioning(_check_captions(texts), drop_prob, "", generator, dropped)
        device = next(self.parameters()).device
        context, pooled = self.encode_tokens(
            self.tokenize(texts).to(device), pooled=self.output_pooled
        )
        if not self.output_pooled:
            return {"context": context}
        return {"context": context, "pooled": pooled}

    def empty(self, batch_size: int = 1) -> Conditioning:
        """The unconditional input: the encoding of the empty caption, for every sample."""
        cond = self([""])
        return {key: value.expand(batch_size, *value.shape[1:]) for key, value in cond.items()}


# --------------------------------------------------------------------------- from scratch


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention over the real tokens and a GEGLU feed-forward, each residual."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width, dropout=dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x`` (B, L, width); ``keep`` (B, 1, 1, L) bool, True at keys that are real tokens."""
        qkv = rearrange(self.to_qkv(self.norm1(x)), "b n (k h d) -> k b h n d", k=3, h=self.heads)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keep)  # (B,h,L,d)
        x = x + self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + self.ff(self.norm2(x))


class TransformerTextEncoder(_TextConditioner):
    """A small transformer text encoder trained with the UNet (LDM's ``BERTEmbedder`` idea).

    Bidirectional, like LDM's BERT-style encoder: no autoregressive objective trains it, and
    every token's state sees the whole caption (a causal encoder's early tokens never see the
    later words). Padding keys are masked, so padding changes no real token's state.
    ``pooled`` is the mean of the real tokens' states (SOT to EOT).
    """

    def __init__(
        self,
        *,
        width: int = 256,  # token width: the UNet's context_dim
        depth: int = 4,  # transformer blocks
        heads: int = 4,  # attention heads
        max_length: int = 77,  # tokens per caption, SOT and EOT included
        dropout: float = 0.0,  # on the attention and feed-forward outputs
        pooled: bool = False,  # also return "pooled": the mean real-token state (B, width)
    ):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        if max_length < 2:
            raise ValueError(f"max_length must leave room for SOT and EOT, got {max_length}")
        self.max_length, self.output_pooled, self.width = max_length, pooled, width
        self.tokenizer = SimpleTokenizer(context_length=max_length)
        self.eot_token_id: int = self.tokenizer.eot_token_id
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)  # 49408 ids
        self.positional_embedding = nn.Parameter(torch.empty(max_length, width))
        self.blocks = nn.ModuleList(_EncoderBlock(width, heads, dropout) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def encode_tokens(self, tokens: Tensor, pooled: bool = True) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, L <= max_length), zero-padded after EOT -> states (B, L, width) and,
        if asked, the mean over SOT..EOT (B, width)."""
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"{length} tokens exceed max_length {self.max_length}")
        eot = (tokens == self.eot_token_id).int().argmax(dim=-1)  # (B,) first EOT
        keep = torch.arange(length, device=tokens.device) <= eot[:, None]  # (B, L)
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x, keep[:, None, None, :])
        x = self.ln_final(x)
        if not pooled:
            return x, None
        weights = keep.to(x.dtype)[..., None]  # (B, L, 1)
        return x, (x * weights).sum(dim=1) / weights.sum(dim=1)


# --------------------------------------------------------------------------- classes


class ClassEmbedder(nn.Module):
    """Class labels (B,) int64 -> ``{"context": (B, 1, dim)}``, or ``{"y": labels}``.

    Label ``num_classes`` is the null class of classifier-free guidance. With ``dim`` the
    labels index a table of ``num_classes + 1`` rows (LDM's ``ClassEmbedder``: one context
    token for cross-attention). With ``dim=None`` the labels pass through to the UNet's
    ``y`` path, and the UNet needs ``num_classes=num_classes + 1`` to embed the null class.
    """

    input_key = "label"  # what it reads from a data batch

    def __init__(
        self,
        num_classes: int,  # real classes, labelled 0 .. num_classes - 1
        dim: int | None = 512,  # context token width (the UNet's context_dim); None: y path
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.dim = num_classes, dim
        self.register_buffer("null_label", torch.tensor(num_classes), persistent=False)
        self.embedding = nn.Embedding(num_classes + 1, dim) if dim is not None else None

    def forward(
        self,
        labels: Tensor,
        *,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
        dropped: Tensor | None = None,
    ) -> Conditioning:
        """Each label becomes the null class with probability ``drop_prob`` first (or where
        the bool mask ``dropped`` says)."""
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"class labels must be a (B,) integer tensor, got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes - 1}] ({self.num_classes} is "
                f"the null class); got min {labels.min().item()}, max {labels.max().item()}"
            )
        labels = drop_conditioning(labels.long(), drop_prob, self.num_classes, generator, dropped)
        if self.embedding is None:
            return {"y": labels}
        return {"context": self.embedding(labels)[:, None]}  # (B, 1, dim)

    def empty(self, batch_size: int = 1) -> Conditioning:
        """The unconditional input: the null class for every sample."""
        return self(self.null_label.expand(batch_size))


def __getattr__(name: str) -> Any:
    """``OpenCLIPTextEncoder`` and ``find_openclip_weights`` live in ``ldm.models.openclip``;
    configs and checkpoints that name them here still find them."""
    if name in ("OpenCLIPTextEncoder", "find_openclip_weights"):
        from ldm.models import openclip

        return getattr(openclip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
