"""Key and config maps between our UNet (Stable Diffusion's original layout) and diffusers'
``UNet2DConditionModel`` layout. Pure dictionaries in and out; diffusers is not imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

# Inside a resnet block: ours (original SD) -> diffusers.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(ours, diffusers, is_resnet)`` module prefixes for a UNet built from ``config``."""
    levels = len(config["channel_multipliers"])
    per_level = config["blocks_per_level"]
    attention = set(config["attention_levels"])
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("label_emb", "class_embedding", False),
        ("pooled_emb.0", "class_embedding.linear_1", False),
        ("pooled_emb.2", "class_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    k = 1
    for level in range(levels):
        for j in range(per_level):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", True))
            if level in attention:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", False))
            k += 1
        if level != levels - 1:
            pairs.append(
                (f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False)
            )
            k += 1
    mid = config.get("mid_attention", True)
    pairs.append(("middle_block.0", "mid_block.resnets.0", True))
    if mid:
        pairs.append(("middle_block.1", "mid_block.attentions.0", False))
    pairs.append((f"middle_block.{2 if mid else 1}", "mid_block.resnets.1", True))
    for up, level in enumerate(reversed(range(levels))):
        for j in range(per_level + 1):
            k = up * (per_level + 1) + j
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", True))
            if level in attention:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}", False))
            if level and j == per_level:
                index = 2 if level in attention else 1
                pairs.append(
                    (f"output_blocks.{k}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", False)
                )
    return pairs


def _rename(
    state_dict: Mapping[str, Tensor], table: dict[str, tuple[str, bool]], inner: dict[str, str]
) -> dict[str, Tensor]:
    out, unmapped = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest known prefix first
            prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
            if prefix in table:
                target, is_resnet = table[prefix]
                if is_resnet:
                    head, _, leaf = rest.rpartition(".")
                    rest = f"{inner.get(head, head)}.{leaf}"
                out[f"{target}.{rest}"] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} key(s) have no counterpart for this UNet config: "
            f"{', '.join(unmapped[:20])}{' ...' if len(unmapped) > 20 else ''}"
        )
    return out


def unet_to_diffusers(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict:
    """Our UNet's state dict -> diffusers ``UNet2DConditionModel`` key names."""
    table = {ours: (theirs, res) for ours, theirs, res in _prefixes(config)}
    return _rename(state_dict, table, _RESNET)


def unet_from_diffusers(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict -> our key names."""
    table = {theirs: (ours, res) for ours, theirs, res in _prefixes(config)}
    return _rename(state_dict, table, {v: k for k, v in _RESNET.items()})


_DOWN, _CROSS_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
_UP, _CROSS_UP = "UpBlock2D", "CrossAttnUpBlock2D"


# diffusers UNet options with the one value our UNet implements.
_FIXED_OPTIONS = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "addition_embed_type": None,
    "time_cond_proj_dim": None,
    "class_embeddings_concat": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}


def _refuse_unsupported(c: Mapping[str, Any]) -> None:
    """A ValueError naming every option of ``c`` that our UNet does not implement."""
    bad = [f"{k}={c[k]!r}" for k, want in _FIXED_OPTIONS.items() if k in c and c[k] != want]
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        bad.append(f"mid_block_type={c['mid_block_type']!r}")
    if c.get("class_embed_type") not in (None, "projection"):
        bad.append(f"class_embed_type={c['class_embed_type']!r}")
    if bad:
        raise ValueError(f"diffusers UNet options our UNet does not implement: {', '.join(bad)}")


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's constructor arguments for a diffusers ``UNet2DConditionModel`` config.

    Refuses options our UNet does not implement, naming them.
    """
    c = dict(config)
    _refuse_unsupported(c)
    channels = list(c.get("block_out_channels", (320, 640, 1280, 1280)))
    base = channels[0]
    if any(ch % base for ch in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down = list(c.get("down_block_types", [_CROSS_DOWN] * 3 + [_DOWN]))
    up = list(c.get("up_block_types", [_UP] + [_CROSS_UP] * 3))
    attention = [i for i, kind in enumerate(down) if kind == _CROSS_DOWN]
    if [kind == _CROSS_UP for kind in reversed(up)] != [kind == _CROSS_DOWN for kind in down]:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    if set(down) - {_DOWN, _CROSS_DOWN} or set(up) - {_UP, _CROSS_UP}:
        raise ValueError(f"unsupported block types in {down} / {up}")
    per_level = c.get("layers_per_block", 2)
    if not isinstance(per_level, int):
        raise ValueError(f"layers_per_block must be one integer here, got {per_level}")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    kwargs: dict[str, Any] = {}
    if isinstance(heads, int):
        kwargs.update(num_heads=heads, head_dim=None)
    else:
        dims = {ch // h for ch, h in zip(channels, heads, strict=True)}
        if len(dims) != 1:
            raise ValueError(f"heads {list(heads)} give different head widths per level")
        kwargs.update(num_heads=None, head_dim=dims.pop())
    depth = c.get("transformer_layers_per_block", 1)
    pooled = c.get("projection_class_embeddings_input_dim")
    return {
        "in_channels": c.get("in_channels", 4),
        "out_channels": c.get("out_channels", 4),
        "model_channels": base,
        "channel_multipliers": [ch // base for ch in channels],
        "blocks_per_level": per_level,
        "attention_levels": attention,
        "transformer_depth": depth if isinstance(depth, int) else list(depth),
        "context_dim": c.get("cross_attention_dim", 1280),
        "linear_projection": c.get("use_linear_projection", False),
        "mid_attention": True,
        "num_classes": c.get("num_class_embeds"),
        "pooled_dim": pooled if c.get("class_embed_type") == "projection" else None,
        "scale_shift": c.get("resnet_time_scale_shift", "default") == "scale_shift",
        "norm_groups": c.get("norm_num_groups", 32),
        **kwargs,
    }


def unet_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config for our UNet's constructor arguments."""
    if not config.get("mid_attention", True):
        raise ValueError("diffusers' UNet2DConditionModel has no middle block without attention")
    if config.get("num_classes") is not None and config.get("pooled_dim") is not None:
        raise ValueError("diffusers has one class embedding: use num_classes or pooled_dim")
    if config.get("positional_embedding"):
        raise ValueError(
            "diffusers' UNet2DConditionModel has no positional embedding on transformer tokens "
            "(positional_embedding=true): the export would compute something else"
        )
    base, mults = config["model_channels"], config["channel_multipliers"]
    channels = [base * m for m in mults]
    attention = set(config["attention_levels"])
    down = [_CROSS_DOWN if i in attention else _DOWN for i in range(len(mults))]
    if config.get("head_dim") is not None:
        heads: int | list[int] = [ch // config["head_dim"] for ch in channels]
    else:
        heads = config["num_heads"]
    out: dict[str, Any] = {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
        "layers_per_block": config["blocks_per_level"],
        "attention_head_dim": heads,
        "cross_attention_dim": config["context_dim"],
        "use_linear_projection": config["linear_projection"],
        "transformer_layers_per_block": config["transformer_depth"],
        "norm_num_groups": config["norm_groups"],
        "resnet_time_scale_shift": "scale_shift" if config["scale_shift"] else "default",
    }
    if config.get("num_classes") is not None:
        out["num_class_embeds"] = config["num_classes"]
    if config.get("pooled_dim") is not None:
        out["class_embed_type"] = "projection"
        out["projection_class_embeddings_input_dim"] = config["pooled_dim"]
    return out


def unet_module_path(path: str, config: Mapping[str, Any], *, to_diffusers: bool = True) -> str:
    """A module's dotted path in our UNet -> in diffusers' (or back with ``to_diffusers=False``),
    e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` <->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``."""
    pairs = [(a, b, r) if to_diffusers else (b, a, r) for a, b, r in _prefixes(config)]
    inner = _RESNET if to_diffusers else {v: k for k, v in _RESNET.items()}
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # longest known prefix first
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        for source, target, is_resnet in pairs:
            if prefix == source:
                if is_resnet and rest:
                    rest = inner.get(rest, rest)
                return f"{target}.{rest}" if rest else target
    layout = "diffusers" if to_diffusers else "original"
    raise ValueError(f"module {path!r} has no counterpart in the {layout} UNet layout")
