"""A frozen text tower of CLIP (Radford et al. 2021) as trained by OpenCLIP (Cherti et al.
2023), read at its last or penultimate layer (Stable Diffusion 2.x: ViT-H-14's penultimate;
SD 1.x: ViT-L-14's last, from its transformers layout); weights from a local file or
open_clip's cache, never downloaded."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ldm.io import load_into, read_weights
from ldm.models.conditioners import _TextConditioner

# Top-level names of the text half of open_clip.model.CLIP: what a text tower's keys start with.
_OPENCLIP_TEXT_KEYS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
)


def find_openclip_weights(arch: str, tag: str, cache_dir: str | Path | None = None) -> Path:
    """The local file of open_clip's pretrained ``tag`` for ``arch``; never downloads.

    Looks where ``open_clip.create_model(arch, pretrained=tag, cache_dir=cache_dir)`` would
    have downloaded it: the Hugging Face hub cache (``cache_dir``, else ``HF_HUB_CACHE``,
    default ``~/.cache/huggingface/hub``) for hub-hosted tags, preferring the safetensors
    copy, and ``cache_dir`` (default ``~/.cache/clip``) for tags hosted only at a URL.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(
            f"open_clip has no pretrained weights {tag!r} for {arch!r}; "
            f"its tags for {arch!r}: {list_pretrained_tags_by_model(arch) or 'none'}"
        )
    looked, fetch = [], []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/name/" -> ("org/name", "")
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]
        # open_clip takes a safetensors twin first when the hub has one.
        if filename == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        root = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
        folder = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "<revision>"
        looked += [str(folder / name) for name in names]
        fetch.append(
            f"on a machine with network, `hf download {repo_id} {names[0]}` (or {names[-1]}) "
            "fills that cache; copy the cache here, or point HF_HUB_CACHE / cache_dir at it"
        )
    url = "" if hub else cfg.get("url", "")  # OpenAI's URL files are TorchScript: hub first
    if url:
        path = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return path
        looked.append(str(path))
        fetch.append(f"download {url} to {path}")
    raise FileNotFoundError(
        f"OpenCLIP weights {arch} / {tag} are not on this machine, and nothing is downloaded. "
        f"Looked for: {'; '.join(looked)}. To fix: {'; or '.join(fetch)}; "
        "or pass weights_path=<a local .safetensors / .bin / .pt file>."
    )


class _OpenCLIPText(nn.Module):
    """The text half of ``open_clip.model.CLIP`` under CLIP's own attribute names, so its
    keys are those of an open_clip checkpoint (and of SD 2.x's ``cond_stage_model.model.``).

    Built from open_clip's text tower alone: SD 2.x built the whole CLIP and ran
    ``del model.visual``, which briefly costs the vision tower's memory (632M parameters
    for ViT-H-14) for the same parameters.
    """

    def __init__(self, embed_dim: int, text_cfg: Mapping[str, Any], quick_gelu: bool):
        super().__init__()
        from open_clip.model import _build_text_tower

        text = _build_text_tower(embed_dim, dict(text_cfg), quick_gelu)
        # The assignments of open_clip.model.CLIP.__init__.
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.text_pool_type: str = getattr(text, "pool_type", "argmax")
        self.text_eos_id: int | None = getattr(text, "eos_id", None)
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)  # causal, or None
        # Unused for encoding; open_clip and SD 2.x checkpoints hold it, so strict loads fit.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


# Where a Hugging Face CLIPTextModel's keys begin: SD 1.x single files, a diffusers folder's
# text_encoder/model.safetensors, a CLIPModel's text half.
_HF_CLIP_PREFIXES = ("cond_stage_model.transformer.", "transformer.", "text_encoder.", "")


def hf_clip_text_to_openclip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``CLIPTextModel`` state dict (``[text_model.]embeddings.*``,
    ``encoder.layers.*``; SD 1.x keeps its tower so) in open_clip's text layout: q / k / v
    projections fused into ``in_proj``, ``text_projection`` transposed when there is one.
    Empty when it is not that layout."""
    prefix, outer = next(
        (
            (p + inner, p)  # files say text_model.*; transformers >= 5 in memory does not
            for p in _HF_CLIP_PREFIXES
            for inner in ("text_model.", "")
            if p + inner + "embeddings.token_embedding.weight" in state
        ),
        (None, None),
    )
    if prefix is None:
        return {}
    hf = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
    }
    names = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")]
            )
            for theirs, ours in names.items():
                out[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
    projection = state.get(outer + "text_projection.weight")
    if projection is not None:  # CLIPTextModelWithProjection / CLIPModel: a bias-free Linear
        out["text_projection"] = projection.T.contiguous()
    return out


def _text_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower tensors of an open_clip, SD 1.x / 2.x, transformers CLIP or
    ``OpenCLIPTextEncoder`` state dict, keyed as ``_OpenCLIPText`` keys them (vision-tower
    keys are left out)."""
    converted = hf_clip_text_to_openclip(state)
    if converted:
        return converted
    for prefix in ("cond_stage_model.model.", "model.", "module.", ""):
        text = {
            key[len(prefix) :]: value
            for key, value in state.items()
            if key.startswith(prefix) and key[len(prefix) :].startswith(_OPENCLIP_TEXT_KEYS)
        }
        if "token_embedding.weight" in text:
            return text
    return {}


class OpenCLIPTextEncoder(_TextConditioner):
    """A frozen OpenCLIP text tower: captions -> ``{"context": (B, 77, width)}``.

    ``self.model`` holds open_clip's own text modules (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``,
    ``logit_scale``, the ``attn_mask`` buffer), so an SD 2.x checkpoint's
    ``cond_stage_model.*`` keys load as they are once that prefix is stripped.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",  # open_clip model name; ViT-H-14 is SD 2.x's, ViT-L-14 ...
        pretrained: str | None = None,  # open_clip tag, e.g. "laion2b_s32b_b79k"; cache only
        *,
        weights_path: str | Path | None = None,  # or a local weights file (not with a tag)
        cache_dir: str | Path | None = None,  # open_clip's cache_dir (see find_openclip_weights)
        layer: Literal["last", "penultimate"] = "penultimate",  # tokens from this layer
        max_length: int = 77,  # tokens per caption, SOT and EOT included
        freeze: bool = True,  # no gradients, and eval mode whatever .train() says
        pooled: bool = False,  # also return "pooled": the projected EOT state (B, embed_dim)
        pad_with_eot: bool = False,  # pad with EOT ids (SD 1.x's tokenizer) instead of 0
        model_config: Mapping[str, Any] | None = None,  # open_clip config instead of arch's
    ):
        super().__init__()
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if pretrained is not None and weights_path is not None:
            raise ValueError("give pretrained (an open_clip tag) or weights_path, not both")
        cfg = open_clip.get_model_config(arch) if model_config is None else dict(model_config)
        if cfg is None:
            raise ValueError(
                f"unknown open_clip architecture {arch!r}; see open_clip.list_models()"
            )
        text_cfg = dict(cfg["text_cfg"])
        if (
            text_cfg.get("hf_model_name")
            or text_cfg.get("hf_tokenizer_name")
            or text_cfg.get("embed_cls")
            or "siglip" in arch.lower()
        ):
            raise ValueError(
                f"{arch!r} has a Hugging Face, SigLIP or CoCa text tower; OpenCLIPTextEncoder "
                "supports open_clip's CLIP text transformer with the CLIP BPE tokenizer"
            )
        context_length = text_cfg.get("context_length", 77)
        if not 2 <= max_length <= context_length:
            raise ValueError(f"max_length must be in [2, {context_length}], got {max_length}")
        self.arch, self.layer, self.max_length = arch, layer, max_length
        self.output_pooled, self.frozen, self.pad_with_eot = pooled, freeze, pad_with_eot
        tag_cfg = {}
        if pretrained is not None:  # found (or failed) before the slow build
            weights_path = find_openclip_weights(arch, pretrained, cache_dir)
            tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, pretrained)
        # Weights trained with QuickGELU (OpenAI's) need it whatever the model name says.
        quick_gelu = bool(cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
        self.model = _OpenCLIPText(cfg["embed_dim"], text_cfg, quick_gelu)
        # What open_clip.get_tokenizer(arch) returns for these towers; its vocabulary ships in
        # the open_clip wheel.
        self.tokenizer_kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=max_length, **self.tokenizer_kwargs
        )
        if weights_path is not None:
            self.load_weights(weights_path)
        if freeze:
            self.requires_grad_(False)
            self.train(False)

    def load_weights(self, path: str | Path) -> None:
        """Load the text tower from a file: an open_clip or SD checkpoint, a transformers
        CLIP text model, or this module's own state dict (safetensors or weights-only
        pickle)."""
        self.load_text_state(read_weights(path), what=str(path))

    def load_text_state(self, state: Mapping[str, Tensor], what: str = "state dict") -> None:
        """Load the text tower from a state dict in open_clip's layout (open_clip, SD 2.x,
        ours) or transformers' (SD 1.x, a diffusers folder's text_encoder)."""
        text = _text_state(state)
        if not text:
            raise ValueError(
                f"{what} holds no CLIP text tower: no key ends in 'token_embedding.weight' "
                "under '', 'model.', 'module.' or 'cond_stage_model.model.', nor in "
                "'text_model.embeddings.token_embedding.weight' (transformers' layout)"
            )
        text.setdefault("logit_scale", self.model.logit_scale.detach())
        if "text_projection" not in text:  # a CLIPTextModel without one (SD 1.x)
            if self.output_pooled:
                raise ValueError(
                    f"{what} has no text projection (a transformers CLIPTextModel, as SD 1.x "
                    "keeps): pooled=True cannot be computed from it; set pooled=false"
                )
            text["text_projection"] = self.model.text_projection.detach()  # unused
        load_into(self.model, text, what=f"OpenCLIP {self.arch} text tower from {what}")

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """As ``_TextConditioner.tokenize``; with ``pad_with_eot`` every position after the
        first EOT holds EOT, as the Hugging Face CLIP tokenizer of SD 1.x pads."""
        tokens = super().tokenize(texts)
        if not self.pad_with_eot:
            return tokens
        eot = self.tokenizer.eot_token_id
        first = (tokens == eot).int().argmax(dim=-1)  # (B,)
        return tokens.masked_fill(torch.arange(tokens.shape[1]) > first[:, None], eot)

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        """A frozen encoder stays in eval mode (no dropout) when its parent trains."""
        return super().train(mode and not self.frozen)

    def encode_tokens(self, tokens: Tensor, pooled: bool = True) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, L) -> ``ln_final`` of the chosen layer's states (B, L, width) and,
        if asked, ``encode_text``'s projected EOT vector (B, embed_dim), always from the last
        layer."""
        model = self.model
        length = tokens.shape[1]
        dtype = model.transformer.get_cast_dtype()
        mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
        x = model.token_embedding(tokens).to(dtype) + model.positional_embedding[:length].to(dtype)
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:  # open_clip before 2.2x: blocks take (L, B, width)
            x = x.transpose(0, 1)
        blocks = model.transformer.resblocks
        stop = len(blocks) - 1 if self.layer == "penultimate" else len(blocks)
        hidden = None
        for index, block in enumerate(blocks):
            if index == stop:
                hidden = x  # the penultimate layer's output: the last block's input
                if not pooled:
                    break
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
            hidden = None if hidden is None else hidden.transpose(0, 1)
        final = model.ln_final(x)  # (B, L, width)
        context = final if hidden is None else model.ln_final(hidden)
        if not pooled:
            return context, None
        vector = self._pool(final, tokens)  # (B, width)
        projection = model.text_projection
        if isinstance(projection, nn.Linear):
            vector = projection(vector)
        elif projection is not None:
            vector = vector @ projection  # (B, embed_dim)
        return context, vector

    def _pool(self, x: Tensor, tokens: Tensor) -> Tensor:
        """open_clip's ``text_global_pool``: CLIP reads the EOT token (the largest id)."""
        rows = torch.arange(x.shape[0], device=x.device)
        kind = self.model.text_pool_type
        if kind == "argmax":  # CLIP's EOT has the largest id, but added tokens come after it
            eot = self.tokenizer.eot_token_id
            return x[rows, (tokens == eot).int().argmax(dim=-1)]
        if kind == "eos":
            return x[rows, (tokens == self.model.text_eos_id).int().argmax(dim=-1)]
        if kind == "first":
            return x[:, 0]
        if kind == "last":
            return x[:, -1]
        raise ValueError(f"text pool type {kind!r} gives no pooled vector")
