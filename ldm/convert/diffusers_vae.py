"""Key and config maps between our ``AutoencoderKL`` (Stable Diffusion's original layout) and
diffusers' ``AutoencoderKL``. Pure dictionaries in and out; diffusers is not imported.

The original attention projections are 1x1 convolutions (C, C, 1, 1); diffusers' are
Linear layers (C, C): the maps reshape them. Older diffusers files name the attention
``query`` / ``key`` / ``value`` / ``proj_attn``; those load too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.models.vae import SD_VAE_SCALE

# Inside blocks: ours (original) -> diffusers.
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTENTION = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
_TOP = {"norm_out": "conv_norm_out"}

_OURS_LEVEL = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)$")
_OURS_RESAMPLE = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.(.+)$")
_OURS_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)$")
_THEIRS_LEVEL = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$"
)
_THEIRS_RESAMPLE = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.(.+)$"
)
_THEIRS_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.+)$")


def _levels(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise ValueError(f"no decoder level found (no key matches {pattern!r}): not a KL VAE")
    return max(found) + 1


def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    head, _, leaf = rest.rpartition(".")
    return f"{table.get(head, head)}.{leaf}"


def _is_attention_projection(key: str) -> bool:
    return bool(re.search(r"\.(q|k|v|proj_out)\.weight$", key))


def vae_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our VAE's state dict -> diffusers ``AutoencoderKL`` key names (and Linear shapes)."""
    levels = _levels(list(state_dict), r"^decoder\.up\.(\d+)\.")
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if m := _OURS_LEVEL.match(key):
            trunk, level, kind, index, rest = m.groups()
            level = int(level) if trunk == "encoder.down" else levels - 1 - int(level)
            table = _RESNET if kind == "block" else _ATTENTION
            kind = "resnets" if kind == "block" else "attentions"
            new = f"{trunk}_blocks.{level}.{kind}.{index}.{_rename_inner(rest, table)}"
        elif m := _OURS_RESAMPLE.match(key):
            trunk, level, kind, rest = m.groups()
            level = int(level) if trunk == "encoder.down" else levels - 1 - int(level)
            new = f"{trunk}_blocks.{level}.{kind}rs.0.{rest}"
        elif m := _OURS_MID.match(key):
            trunk, part, rest = m.groups()
            table = _RESNET if part.startswith("block") else _ATTENTION
            new = f"{trunk}.mid_block.{_MID[part]}.{_rename_inner(rest, table)}"
        elif m := re.match(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(\w+)$", key):
            trunk, part, leaf = m.groups()
            new = f"{trunk}.{_TOP.get(part, part)}.{leaf}"
        elif re.match(r"^(post_)?quant_conv\.\w+$", key):
            new = key
        else:
            unmapped.append(key)
            continue
        if _is_attention_projection(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[new] = value
    _refuse_unmapped(unmapped)
    return out


def vae_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict (current or legacy attention names) -> ours."""
    levels = _levels(list(state_dict), r"^decoder\.up_blocks\.(\d+)\.")
    attention = {v: k for k, v in _ATTENTION.items()} | _LEGACY_ATTENTION
    resnet = {v: k for k, v in _RESNET.items()}
    top = {v: k for k, v in _TOP.items()}
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if m := _THEIRS_LEVEL.match(key):
            trunk, level, kind, index, rest = m.groups()
            trunk = trunk.removesuffix("_blocks")
            level = int(level) if trunk == "encoder.down" else levels - 1 - int(level)
            if kind == "resnets":
                new = f"{trunk}.{level}.block.{index}.{_rename_inner(rest, resnet)}"
            else:
                new = f"{trunk}.{level}.attn.{index}.{_rename_inner(rest, attention)}"
        elif m := _THEIRS_RESAMPLE.match(key):
            trunk, level, kind, rest = m.groups()
            trunk = trunk.removesuffix("_blocks")
            level = int(level) if trunk == "encoder.down" else levels - 1 - int(level)
            new = f"{trunk}.{level}.{kind.removesuffix('rs')}.{rest}"
        elif m := _THEIRS_MID.match(key):
            trunk, part, rest = m.groups()
            ours = {v: k for k, v in _MID.items()}[part]
            table = resnet if ours.startswith("block") else attention
            new = f"{trunk}.mid.{ours}.{_rename_inner(rest, table)}"
        elif m := re.match(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(\w+)$", key):
            trunk, part, leaf = m.groups()
            new = f"{trunk}.{top.get(part, part)}.{leaf}"
        elif re.match(r"^(post_)?quant_conv\.\w+$", key):
            new = key
        else:
            unmapped.append(key)
            continue
        if _is_attention_projection(new) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    _refuse_unmapped(unmapped)
    return out


def _refuse_unmapped(unmapped: list[str]) -> None:
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} VAE key(s) have no counterpart: {', '.join(unmapped[:20])}"
            f"{' ...' if len(unmapped) > 20 else ''}"
        )


_DOWN, _ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_UP, _ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``AutoencoderKL`` arguments for a diffusers ``AutoencoderKL`` config.

    ``sample_size`` and ``force_upcast`` are runtime hints of diffusers' pipelines and are
    not kept; options our VAE does not implement are refused by name.
    """
    c = dict(config)
    bad = []
    if c.get("act_fn", "silu") != "silu":
        bad.append(f"act_fn={c['act_fn']!r}")
    for key in ("latents_mean", "latents_std"):
        if c.get(key) is not None:
            bad.append(f"{key}=... (per-channel latent statistics)")
    if c.get("use_quant_conv", True) != c.get("use_post_quant_conv", True):
        bad.append("use_quant_conv != use_post_quant_conv")
    channels = list(c.get("block_out_channels", (64,)))
    down = list(c.get("down_block_types", [_DOWN] * len(channels)))
    up = list(c.get("up_block_types", [_UP] * len(channels)))
    if set(down) - {_DOWN, _ATTN_DOWN} or set(up) - {_UP, _ATTN_UP}:
        bad.append(f"block types {down} / {up}")
    elif [kind == _ATTN_UP for kind in reversed(up)] != [kind == _ATTN_DOWN for kind in down]:
        bad.append(f"up_block_types {up} that do not mirror down_block_types {down}")
    base = channels[0]
    if any(ch % base for ch in channels):
        bad.append(f"block_out_channels {channels} (not multiples of the first)")
    if bad:
        raise ValueError(f"diffusers VAE options our AutoencoderKL does not implement: {bad}")
    shift = c.get("shift_factor")
    return {
        "in_channels": c.get("in_channels", 3),
        "out_channels": c.get("out_channels", 3),
        "base_channels": base,
        "channel_multipliers": [ch // base for ch in channels],
        "blocks_per_level": c.get("layers_per_block", 1),
        "attention_levels": [i for i, kind in enumerate(down) if kind == _ATTN_DOWN],
        "mid_attention": c.get("mid_block_add_attention", True),
        "latent_channels": c.get("latent_channels", 4),
        "quant_conv": c.get("use_quant_conv", True),
        "norm_groups": c.get("norm_num_groups", 32),
        "scale_factor": c.get("scaling_factor", SD_VAE_SCALE),
        "shift_factor": 0.0 if shift is None else shift,
    }


def vae_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config for our VAE's constructor arguments."""
    base, mults = config["base_channels"], config["channel_multipliers"]
    attention = set(config.get("attention_levels", ()))
    down = [_ATTN_DOWN if i in attention else _DOWN for i in range(len(mults))]
    out: dict[str, Any] = {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": down,
        "up_block_types": [d.replace("Down", "Up").replace("Encoder", "Decoder") for d in down][
            ::-1
        ],
        "block_out_channels": [base * m for m in mults],
        "layers_per_block": config["blocks_per_level"],
        "latent_channels": config["latent_channels"],
        "norm_num_groups": config["norm_groups"],
        "mid_block_add_attention": config.get("mid_attention", True),
        "use_quant_conv": config.get("quant_conv", True),
        "use_post_quant_conv": config.get("quant_conv", True),
    }
    if config.get("scale_factor") is not None:
        out["scaling_factor"] = config["scale_factor"]
    if config.get("shift_factor"):
        out["shift_factor"] = config["shift_factor"]
    return out
