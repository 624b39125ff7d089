"""Stable Diffusion checkpoints in and out: original single files and diffusers folders.

Original (CompVis) single files hold ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text encoder; for SD 2.x an
open_clip tower under ``cond_stage_model.model.*``). Our modules use the original layout,
so those load by stripping the prefix. diffusers folders hold ``unet/`` (or, for a DiT /
MMDiT, ``transformer/``) and ``vae/``, each a ``config.json`` and
``diffusion_pytorch_model.safetensors``; their keys are mapped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.convert.diffusers_dit import (
    dit_config_from_diffusers,
    dit_config_to_diffusers,
    dit_from_diffusers,
    dit_to_diffusers,
    mmdit_config_from_diffusers,
    mmdit_config_to_diffusers,
    mmdit_from_diffusers,
    mmdit_to_diffusers,
)
from ldm.convert.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm.convert.diffusers_vae import (
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from ldm.io import save_safetensors
from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.unet import UNet

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.",
}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class DiffusersForm:
    """A denoiser backbone of ours and its diffusers model: the pipeline subfolder, the
    ``_class_name``, and the config and weights maps each way (weights maps take the state
    dict and our config)."""

    network: type[nn.Module]
    folder: str
    class_name: str
    config_to: Callable[..., dict[str, Any]]
    weights_to: Callable[..., dict[str, Tensor]]
    config_from: Callable[..., dict[str, Any]]
    weights_from: Callable[..., dict[str, Tensor]]


DIFFUSERS_FORMS = {  # by diffusers' class name
    form.class_name: form
    for form in (
        DiffusersForm(
            UNet, "unet", "UNet2DConditionModel", unet_config_to_diffusers,
            unet_to_diffusers, unet_config_from_diffusers, unet_from_diffusers,
        ),
        DiffusersForm(
            DiT, "transformer", "DiTTransformer2DModel", dit_config_to_diffusers,
            dit_to_diffusers, dit_config_from_diffusers, dit_from_diffusers,
        ),
        DiffusersForm(
            MMDiT, "transformer", "SD3Transformer2DModel", mmdit_config_to_diffusers,
            mmdit_to_diffusers, mmdit_config_from_diffusers, mmdit_from_diffusers,
        ),
    )
}  # fmt: skip


def diffusers_form(denoiser: nn.Module) -> DiffusersForm:
    """The diffusers form of ``denoiser``; a ValueError for a backbone without one."""
    for form in DIFFUSERS_FORMS.values():
        if type(denoiser) is form.network:
            return form
    names = sorted(f.network.__name__ for f in DIFFUSERS_FORMS.values())
    raise ValueError(f"a {type(denoiser).__name__} has no diffusers form; {names} do")


@dataclass
class SplitCheckpoint:
    """An original SD checkpoint cut into its parts, with what belongs to none of them."""

    parts: dict[str, dict[str, Tensor]]
    other: list[str] = field(default_factory=list)  # e.g. model_ema.*, betas, alphas_cumprod


def split_checkpoint(state_dict: Mapping[str, Tensor]) -> SplitCheckpoint:
    """Cut an original single-file SD state dict into ``unet``, ``vae`` and ``text`` parts."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in PREFIXES}
    other = []
    for key, value in state_dict.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            other.append(key)
    if not parts["unet"]:
        raise ValueError(
            "no key starts with 'model.diffusion_model.': this is not an original Stable "
            "Diffusion checkpoint (ldm.pipeline.open_checkpoint reads diffusers folders)"
        )
    return SplitCheckpoint(parts, sorted(other))


def infer_unet_config(unet_state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The SD-family UNet shape a state dict (our / original layout) was trained with.

    Reads the channel widths, levels, blocks per level, attention levels, context width
    and projection kind from tensor shapes; head settings cannot be read from weights and
    follow the SD convention (8 heads with conv projection, 64-wide heads with linear).
    """
    first = unet_state["input_blocks.0.0.weight"]  # (C, in, 3, 3)
    base, in_channels = first.shape[0], first.shape[1]
    out_channels = unet_state["out.2.weight"].shape[0]
    block_ids = sorted({int(k.split(".")[1]) for k in unet_state if k.startswith("input_blocks.")})
    downsamples = [i for i in block_ids if f"input_blocks.{i}.0.op.weight" in unet_state]
    levels = len(downsamples) + 1
    per_level = (len(block_ids) - 1 - len(downsamples)) // levels
    multipliers, attention = [], []
    for level in range(levels):
        index = 1 + level * (per_level + 1)
        multipliers.append(
            unet_state[f"input_blocks.{index}.0.in_layers.2.weight"].shape[0] // base
        )
        if f"input_blocks.{index}.1.proj_in.weight" in unet_state:
            attention.append(level)
    proj = next((unet_state[k] for k in unet_state if k.endswith(".proj_in.weight")), None)
    context = next(
        (v.shape[1] for k, v in unet_state.items() if k.endswith("attn2.to_k.weight")), None
    )
    linear = proj is not None and proj.ndim == 2
    depth = []
    for level in range(levels):
        prefix = f"input_blocks.{1 + level * (per_level + 1)}.1.transformer_blocks."
        ids = {k[len(prefix) :].split(".")[0] for k in unet_state if k.startswith(prefix)}
        depth.append(max(1, len(ids)))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": base,
        "channel_multipliers": multipliers,
        "blocks_per_level": per_level,
        "attention_levels": attention,
        "transformer_depth": depth[0] if len(set(depth)) == 1 else depth,
        "num_heads": None if linear else 8,
        "head_dim": 64 if linear else None,
        "context_dim": context,
        "linear_projection": linear,
        "mid_attention": "middle_block.1.proj_in.weight" in unet_state,
        "num_classes": unet_state["label_emb.weight"].shape[0]
        if "label_emb.weight" in unet_state
        else None,
        "pooled_dim": unet_state["pooled_emb.0.weight"].shape[1]
        if "pooled_emb.0.weight" in unet_state
        else None,
        "scale_shift": unet_state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        == 2 * unet_state["input_blocks.1.0.in_layers.2.weight"].shape[0],
        "dropout": 0.0,
        "norm_groups": 32,
        "positional_embedding": False,  # weights cannot tell; SD and diffusers have none
    }


def weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or .bin) in {folder}")


def save_diffusers_folder(
    out: str | Path, *, denoiser: nn.Module, vae: nn.Module | None = None
) -> Path:
    """Write the denoiser (``unet/``; a DiT's or MMDiT's ``transformer/``) and ``vae/`` in
    the diffusers layout: config.json + safetensors each."""
    root = Path(out)
    form = diffusers_form(denoiser)
    weights = form.weights_to(denoiser.state_dict(), denoiser.config)  # refuses what it can't
    (root / form.folder).mkdir(parents=True, exist_ok=True)
    config = {"_class_name": form.class_name, **form.config_to(denoiser.config)}
    (root / form.folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(root / form.folder / WEIGHTS_NAME, weights)
    if vae is not None:
        vae_dir = root / "vae"
        vae_dir.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "AutoencoderKL", **vae_config_to_diffusers(vae.config)}
        (vae_dir / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors(vae_dir / WEIGHTS_NAME, vae_to_diffusers(vae.state_dict()))
    return root


def infer_vae_config(vae_state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``AutoencoderKL`` shape a state dict (our / original layout) was trained with.

    GroupNorm groups and the latent scale cannot be read from weights: ``norm_groups``
    follows the SD convention (32) and ``scale_factor`` is left unset (SD 1.x / 2.x use
    0.18215, SDXL 0.13025).
    """
    conv_in = vae_state["encoder.conv_in.weight"]  # (ch, in, 3, 3)
    base = conv_in.shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in vae_state if k.startswith("encoder.down."))
    blocks = len({k.split(".")[4] for k in vae_state if k.startswith("encoder.down.0.block.")})
    multipliers = [
        vae_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels)
    ]
    return {
        "in_channels": conv_in.shape[1],
        "out_channels": vae_state["decoder.conv_out.weight"].shape[0],
        "base_channels": base,
        "channel_multipliers": multipliers,
        "blocks_per_level": blocks,
        "attention_levels": [
            i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in vae_state
        ],
        "mid_attention": "encoder.mid.attn_1.q.weight" in vae_state,
        "latent_channels": vae_state["decoder.conv_in.weight"].shape[1],
        "quant_conv": "quant_conv.weight" in vae_state,
        "dropout": 0.0,
        "norm_groups": 32,
        "scale_factor": None,
        "shift_factor": 0.0,
    }
