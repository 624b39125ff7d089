"""Textual Inversion (Gal et al. 2022): new words for a text conditioner, learned as
embedding vectors while every other weight stays as it is.

``add_tokens(conditioner, ["<sks>"], init_words=["dog"])`` adds placeholder tokens to the
tokenizer (as whole tokens, never split) and rows to the token embedding, initialised from
the mean embedding of each init word's tokens. The rows live in a separate parameter
(``token_embedding.extra``) beside the untouched table, so training them alone leaves the
original embedding bit-identical (a weight decay on the whole table would not). Works for
``OpenCLIPTextEncoder`` and ``TransformerTextEncoder``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.io import WeightsFileError, read_safetensors, save_safetensors

METADATA_KEY = "ldm_embeddings"


class ExtendedEmbedding(nn.Embedding):
    """``nn.Embedding`` (same ``weight``) whose ids past the table come from ``extra``."""

    extra: nn.Parameter

    def forward(self, ids: Tensor) -> Tensor:
        out = F.embedding(ids.clamp(max=self.num_embeddings - 1), self.weight)
        new = ids >= self.num_embeddings
        if self.extra.numel() and bool(new.any()):
            rows = self.extra[(ids - self.num_embeddings).clamp(min=0)]
            out = torch.where(new[..., None], rows.to(out.dtype), out)
        return out


def token_embedding(conditioner: nn.Module) -> nn.Embedding:
    """The token embedding of a text conditioner (OpenCLIP tower or from-scratch encoder)."""
    owner = conditioner.model if hasattr(conditioner, "model") else conditioner
    return owner.token_embedding


def added_tokens(conditioner: nn.Module) -> list[str]:
    return list(getattr(conditioner, "added_tokens", []))


def _tokenizer(conditioner: nn.Module, tokens: list[str]) -> Any:
    """The conditioner's CLIP tokenizer with ``tokens`` as unsplittable words; each token
    must come out of it as its own single id."""
    import regex  # what open_clip compiles its token pattern with
    from open_clip.tokenizer import SimpleTokenizer

    fix = "use lowercase letters, digits and <, >, -, _ (e.g. <my-cat>)"
    try:
        tokenizer = SimpleTokenizer(
            additional_special_tokens=tokens or None,
            context_length=conditioner.max_length,
            **getattr(conditioner, "tokenizer_kwargs", {}),
        )
    except regex.error as err:
        raise ValueError(f"placeholder tokens {tokens} break the tokenizer ({err}): {fix}") from err
    # The tokenizer lowercases and cleans captions before matching: a token it would never
    # see again could not be learnt.
    unseen = [t for t in tokens if tokenizer.encode(f"a {t} b")[1:-1] != [tokenizer.encoder[t]]]
    if unseen:
        raise ValueError(f"placeholder tokens {unseen} never come out of captions whole: {fix}")
    return tokenizer


def add_tokens(
    conditioner: nn.Module,
    tokens: Sequence[str],
    *,
    init_words: Sequence[str] | None = None,  # one per token: start from its embedding
    vectors: Tensor | None = None,  # or the vectors themselves (N, width)
) -> list[int]:
    """Add placeholder ``tokens``; returns their ids. The new rows are trainable, the rest of
    the conditioner keeps its ``requires_grad``."""
    tokens = list(tokens)
    existing = added_tokens(conditioner)
    clash = [t for t in tokens if t in existing or " " in t or not t]
    if clash:
        raise ValueError(f"cannot add tokens {clash}: already added, empty or containing spaces")
    embedding = token_embedding(conditioner)
    if vectors is None:
        if init_words is None or len(init_words) != len(tokens):
            raise ValueError("give one init word per token (or the vectors)")
        vectors = torch.stack([_word_vector(conditioner, embedding, word) for word in init_words])
    if vectors.shape != (len(tokens), embedding.embedding_dim):
        width = embedding.embedding_dim
        raise ValueError(
            f"vectors {tuple(vectors.shape)} do not fit {len(tokens)} tokens of {width}"
        )
    tokenizer = _tokenizer(conditioner, existing + tokens)  # checked before any change
    if not isinstance(embedding, ExtendedEmbedding):
        embedding.__class__ = ExtendedEmbedding  # same object, same `weight`
        embedding.extra = nn.Parameter(embedding.weight.new_zeros(0, embedding.embedding_dim))
    rows = vectors.to(embedding.weight.device, embedding.weight.dtype)
    embedding.extra = nn.Parameter(torch.cat([embedding.extra.detach(), rows]))
    conditioner.tokenizer, conditioner.added_tokens = tokenizer, existing + tokens
    first = embedding.num_embeddings + len(existing)
    ids = [conditioner.tokenizer.encoder[t] for t in tokens]
    if ids != list(range(first, first + len(tokens))):
        raise RuntimeError(f"the tokenizer gave ids {ids}, expected {first}..: vocabulary mismatch")
    return ids


@torch.no_grad()
def _word_vector(conditioner: nn.Module, embedding: nn.Embedding, word: str) -> Tensor:
    ids = conditioner.tokenize([word])[0]
    eot = conditioner.tokenizer.eot_token_id
    inner = ids[1 : int((ids == eot).nonzero()[0])]  # between SOT and EOT
    if not len(inner):
        raise ValueError(f"init word {word!r} has no tokens")
    return embedding(inner.to(embedding.weight.device)).float().mean(0)


def token_vectors(conditioner: nn.Module) -> dict[str, Tensor]:
    """Every added token's current vector."""
    embedding = token_embedding(conditioner)
    extra = getattr(embedding, "extra", None)
    return {t: extra[i].detach().clone() for i, t in enumerate(added_tokens(conditioner))}


def save_embeddings(
    conditioner: nn.Module, path: str | Path, tokens: Sequence[str] | None = None
) -> Path:
    """The added tokens' vectors as safetensors keyed by token (atomic write)."""
    vectors = token_vectors(conditioner)
    chosen = list(tokens) if tokens is not None else list(vectors)
    info = {
        "tokens": chosen,
        "width": token_embedding(conditioner).embedding_dim,
        "conditioner": type(conditioner).__name__,
    }
    return save_safetensors(path, {t: vectors[t] for t in chosen}, {METADATA_KEY: json.dumps(info)})


def load_embeddings(conditioner: nn.Module, path: str | Path) -> list[str]:
    """Add the tokens of an embeddings file (``save_embeddings``) to a conditioner."""
    tensors, meta = read_safetensors(path)
    if METADATA_KEY not in meta:
        raise WeightsFileError(f"{path} is not an embeddings file (no {METADATA_KEY!r} metadata)")
    info = json.loads(meta[METADATA_KEY])
    add_tokens(
        conditioner, info["tokens"], vectors=torch.stack([tensors[t] for t in info["tokens"]])
    )
    return info["tokens"]
