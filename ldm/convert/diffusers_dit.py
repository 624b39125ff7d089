"""Key and config maps between our DiT / MMDiT and diffusers' ``DiTTransformer2DModel`` /
``SD3Transformer2DModel``. Pure dictionaries in and out; diffusers is not imported.

diffusers' DiT gives every block its own copy of the timestep and label embedders (all
equal in converted DiT weights); ours keeps one. To diffusers they are copied into every
block; from diffusers the copies must agree, or the conversion refuses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.io import WeightsFileError
from ldm.nn.embeddings import patch_positions

# Ours -> diffusers' DiTTransformer2DModel, outside the blocks.
_DIT = {
    "patches.proj": "pos_embed.proj",
    "final_modulation.1": "proj_out_1",
    "proj_out": "proj_out_2",
}
# The shared embedders: ours -> the part under diffusers' transformer_blocks.{i}.norm1.emb.
_DIT_SHARED = {
    "time_embed.0": "timestep_embedder.linear_1",
    "time_embed.2": "timestep_embedder.linear_2",
    "label_emb": "class_embedder.embedding_table",
}


def _swap(key: str, table: Mapping[str, str]) -> str | None:
    for ours, theirs in table.items():
        if key == ours or key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    return None


def dit_to_diffusers(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict:
    """Our DiT's state dict in diffusers' ``DiTTransformer2DModel`` layout."""
    dit_config_to_diffusers(config)  # refuses what diffusers cannot hold
    out, shared = {}, {}
    for key, value in state_dict.items():
        if (name := _swap(key, _DIT_SHARED)) is not None:
            shared[name] = value
        elif (name := _swap(key, _DIT)) is not None:
            out[name] = value
        elif key.startswith("blocks."):
            out["transformer_blocks." + key[7:].replace("adaLN_modulation.1", "norm1.linear")] = (
                value
            )
        else:
            raise WeightsFileError(f"no diffusers name for DiT weight {key}")
    for i in range(config["depth"]):
        for name, value in shared.items():
            out[f"transformer_blocks.{i}.norm1.emb.{name}"] = value.clone()
    return out


def dit_from_diffusers(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """diffusers' ``DiTTransformer2DModel`` state dict in our DiT layout."""
    inverse, out, shared = {v: k for k, v in _DIT.items()}, {}, {}
    shared_inverse = {v: k for k, v in _DIT_SHARED.items()}
    for key, value in state_dict.items():
        if (name := _swap(key, inverse)) is not None:
            out[name] = value
            continue
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if match is None:
            raise WeightsFileError(f"no DiT weight for diffusers' {key}")
        block, rest = match.groups()
        if rest.startswith("norm1.emb."):
            name = _swap(rest.removeprefix("norm1.emb."), shared_inverse)
            if name is None:
                raise WeightsFileError(f"no DiT weight for diffusers' {key}")
            if name in shared and not torch.equal(shared[name], value):
                raise WeightsFileError(
                    f"diffusers' DiT block {block} has its own {rest}: our DiT shares one "
                    "timestep and label embedder across blocks, so these weights cannot load"
                )
            shared[name] = value
        else:
            out[f"blocks.{block}." + rest.replace("norm1.linear", "adaLN_modulation.1")] = value
    return out | shared


def dit_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our DiT constructor arguments for a diffusers ``DiTTransformer2DModel`` config."""
    refused = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, wanted in refused.items():
        if config.get(key, wanted) != wanted:
            raise WeightsFileError(f"diffusers DiT with {key}={config[key]!r} is not supported")
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise WeightsFileError(f"a DiT with {in_channels} channels in and {out_channels} out")
    classes = config.get("num_embeds_ada_norm", 1000)
    return {
        "in_channels": in_channels,
        "sample_size": config.get("sample_size", 32),
        "patch_size": config.get("patch_size", 2),
        "hidden_size": config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72),
        "depth": config.get("num_layers", 28),
        "num_heads": config.get("num_attention_heads", 16),
        "num_classes": classes + 1,  # diffusers' LabelEmbedding adds the null class row
        "learn_sigma": out_channels == 2 * in_channels,
        "time_freq_shift": 1,
        "mlp_norm_eps": config.get("norm_eps", 1e-5),
        "dropout": config.get("dropout", 0.0),
    }


def dit_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' ``DiTTransformer2DModel`` config for our DiT; refuses what it cannot
    hold (text conditioning, no classes, other timestep frequencies or MLP widths)."""
    unsupported = {
        "context_dim": config.get("context_dim") is not None,
        "pooled_dim": config.get("pooled_dim") is not None,
        "num_classes": config.get("num_classes") is None,
        "time_freq_shift": config.get("time_freq_shift", 1) != 1,
        "mlp_ratio": config.get("mlp_ratio", 4.0) != 4.0,
    }
    if any(unsupported.values()):
        bad = [k for k, v in unsupported.items() if v]
        raise WeightsFileError(
            f"diffusers' DiTTransformer2DModel is class-conditional only, with timestep "
            f"frequency shift 1 and a 4x MLP: this DiT's {bad} cannot be expressed"
        )
    heads = config["num_heads"]
    in_channels = config.get("in_channels", 4)
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": config["hidden_size"] // heads,
        "in_channels": in_channels,
        "out_channels": in_channels * (2 if config.get("learn_sigma") else 1),
        "num_layers": config["depth"],
        "dropout": config.get("dropout", 0.0),
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": config.get("sample_size", 32),
        "patch_size": config.get("patch_size", 2),
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config["num_classes"] - 1,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": config.get("mlp_norm_eps", 1e-5),
    }


# ----------------------------------------------------------------------------- MMDiT

# Ours -> diffusers' SD3Transformer2DModel, outside the blocks.
_MMDIT = {
    "patches.proj": "pos_embed.proj",
    "time_embed.0": "time_text_embed.timestep_embedder.linear_1",
    "time_embed.2": "time_text_embed.timestep_embedder.linear_2",
    "pooled_emb.0": "time_text_embed.text_embedder.linear_1",
    "pooled_emb.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_modulation.1": "norm_out.linear",
    "proj_out": "proj_out",
}
# Inside a block: ours -> diffusers' JointTransformerBlock.
_JOINT = {
    "x_modulation.1": "norm1.linear",
    "c_modulation.1": "norm1_context.linear",
    "attn.to_q": "attn.to_q",
    "attn.to_k": "attn.to_k",
    "attn.to_v": "attn.to_v",
    "attn.to_out.0": "attn.to_out.0",
    "attn.add_q_proj": "attn.add_q_proj",
    "attn.add_k_proj": "attn.add_k_proj",
    "attn.add_v_proj": "attn.add_v_proj",
    "attn.to_add_out": "attn.to_add_out",
    "ff": "ff",
    "ff_context": "ff_context",
}


def _block_swap(key: str, outer: Mapping[str, str], inner: Mapping[str, str], ours: bool) -> str:
    """One key through the outer table or, inside block ``i``, the inner one."""
    blocks, their_blocks = (
        ("blocks.", "transformer_blocks.") if ours else ("transformer_blocks.", "blocks.")
    )
    if (name := _swap(key, outer)) is not None:
        return name
    match = re.fullmatch(re.escape(blocks) + r"(\d+)\.(.+)", key)
    if match and (rest := _swap(match.group(2), inner)) is not None:
        return f"{their_blocks}{match.group(1)}.{rest}"
    raise WeightsFileError(f"no {'diffusers' if ours else 'MMDiT'} name for {key}")


def mmdit_to_diffusers(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict:
    """Our MMDiT's state dict in diffusers' ``SD3Transformer2DModel`` layout, with the
    persistent position table diffusers keeps."""
    out = {_block_swap(k, _MMDIT, _JOINT, True): v for k, v in state_dict.items()}
    theirs = mmdit_config_to_diffusers(config)
    size, base = theirs["pos_embed_max_size"], theirs["sample_size"] // theirs["patch_size"]
    dim = theirs["num_attention_heads"] * theirs["attention_head_dim"]
    positions = patch_positions(size, size, dim, base, size)
    out["pos_embed.pos_embed"] = positions[None].to(next(iter(state_dict.values())).dtype)
    return out


def mmdit_from_diffusers(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """diffusers' ``SD3Transformer2DModel`` state dict in our MMDiT layout (its position
    table is a fixed function of the config, rebuilt rather than loaded)."""
    outer = {v: k for k, v in _MMDIT.items()}
    inner = {v: k for k, v in _JOINT.items()}
    return {
        _block_swap(k, outer, inner, False): v
        for k, v in state_dict.items()
        if k != "pos_embed.pos_embed"
    }


def mmdit_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our MMDiT constructor arguments for a diffusers ``SD3Transformer2DModel`` config."""
    if config.get("dual_attention_layers") or config.get("qk_norm"):
        raise WeightsFileError(
            "SD3.5's dual attention and qk-norm are not supported: only SD3(-medium)-style "
            "MMDiT configurations convert"
        )
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    if config.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
        raise WeightsFileError("caption_projection_dim must equal the transformer width")
    in_channels = config.get("in_channels", 16)
    if (config.get("out_channels") or in_channels) != in_channels:
        raise WeightsFileError("an MMDiT with different channels in and out")
    return {
        "in_channels": in_channels,
        "sample_size": config.get("sample_size", 128),
        "patch_size": config.get("patch_size", 2),
        "hidden_size": heads * head_dim,
        "depth": config.get("num_layers", 18),
        "num_heads": heads,
        "context_dim": config.get("joint_attention_dim", 4096),
        "pooled_dim": config.get("pooled_projection_dim", 2048),
        "pos_embed_max_size": config.get("pos_embed_max_size", 96),
    }


def mmdit_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' ``SD3Transformer2DModel`` config for our MMDiT."""
    if config.get("mlp_ratio", 4.0) != 4.0 or config.get("pooled_dim") is None:
        raise WeightsFileError(
            "diffusers' SD3Transformer2DModel has a 4x MLP and a pooled text vector: this "
            f"MMDiT's mlp_ratio={config.get('mlp_ratio')}, pooled_dim={config.get('pooled_dim')}"
        )
    heads = config["num_heads"]
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": config["sample_size"],
        "patch_size": config["patch_size"],
        "in_channels": config["in_channels"],
        "num_layers": config["depth"],
        "attention_head_dim": config["hidden_size"] // heads,
        "num_attention_heads": heads,
        "joint_attention_dim": config["context_dim"],
        "caption_projection_dim": config["hidden_size"],
        "pooled_projection_dim": config["pooled_dim"],
        "out_channels": config["in_channels"],
        "pos_embed_max_size": config["pos_embed_max_size"],
    }
