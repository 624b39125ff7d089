"""LoRA adapters between our format and the formats other tools read, for SD-layout UNets.

Ours (``save_adapter`` / ``read_adapter``): ``{path}.lora_down.weight`` /
``{path}.lora_up.weight`` with paths in our (original SD) UNet layout, rank / alpha in the
``ldm_lora`` metadata.

* **diffusers / PEFT**: ``unet.{diffusers path}.lora_A.weight`` (down) and ``.lora_B.weight``
  (up); rank and alpha in the ``lora_adapter_metadata`` header (a PEFT ``LoraConfig``),
  which ``UNet2DConditionModel.load_lora_adapter`` and ``pipe.load_lora_weights`` read.
* **kohya** (sd-scripts, for SD 1.x / 2.x): ``lora_unet_{diffusers path, "." -> "_"}``
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a scalar per layer).

Only UNet adapters convert: text-encoder adapters of our towers have no counterpart in
those formats (they name the transformers CLIP layout).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.convert.diffusers_unet import unet_module_path
from ldm.io import WeightsFileError, legacy_names, read_safetensors, save_safetensors
from ldm.models.unet import UNet
from ldm.nn.lora import adapter_settings, adapter_state_dict

DIFFUSERS_METADATA = "lora_adapter_metadata"
KOHYA_PREFIX = "lora_unet_"


def _layers(tensors: Mapping[str, Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})


def _alpha(settings: Mapping[str, Any], down: Tensor) -> float:
    if down.ndim == 4:
        return float(settings.get("conv_alpha") or settings.get("conv_rank") or down.shape[0])
    return float(settings.get("alpha") or down.shape[0])


def _unet_only(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Our tensors with ``prefix`` (e.g. ``denoiser.``) stripped; other parts are refused."""
    if not prefix:
        return dict(tensors)
    other = sorted({k.split(".")[0] for k in tensors if not k.startswith(prefix)})
    if other:
        raise ValueError(f"only UNet adapters convert; this one also adapts {other}")
    return {k[len(prefix) :]: v for k, v in tensors.items()}


def to_diffusers(
    tensors: Mapping[str, Tensor],
    settings: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    *,
    prefix: str = "",  # ours: strip this first ("denoiser." for a LatentDiffusion's networks)
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) in the diffusers / PEFT format."""
    tensors = _unet_only(tensors, prefix)
    out, ranks, alphas = {}, {}, {}
    for layer in _layers(tensors):
        down, up = tensors[f"{layer}.lora_down.weight"], tensors[f"{layer}.lora_up.weight"]
        theirs = unet_module_path(layer, unet_config)
        out[f"unet.{theirs}.lora_A.weight"] = down
        out[f"unet.{theirs}.lora_B.weight"] = up
        ranks[theirs], alphas[theirs] = down.shape[0], _alpha(settings, down)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {k: v for k, v in ranks.items() if v != rank},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": float(settings.get("dropout", 0.0)),
        "use_dora": False,
        "lora_bias": False,
    }
    metadata = {DIFFUSERS_METADATA: json.dumps({f"unet.{k}": v for k, v in config.items()})}
    return out, metadata


def from_diffusers(
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None,
    unet_config: Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(our tensors with per-layer ``{path}.alpha``, settings) from a diffusers / PEFT file."""
    config = {}
    if metadata and DIFFUSERS_METADATA in metadata:
        config = {
            k.removeprefix("unet."): v for k, v in json.loads(metadata[DIFFUSERS_METADATA]).items()
        }
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("unet.") or ".lora_" not in key:
            raise ValueError(f"not a diffusers UNet LoRA key: {key!r}")
        theirs, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        ours = unet_module_path(theirs, unet_config, to_diffusers=False)
        out[f"{ours}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            default = config.get("lora_alpha", value.shape[0])  # PEFT's default: alpha = rank
            alpha = config.get("alpha_pattern", {}).get(theirs, default)
            out[f"{ours}.alpha"] = torch.tensor(float(alpha))
    return out, {"rank": config.get("r"), "alpha": config.get("lora_alpha")}


def _kohya_name(diffusers_path: str) -> str:
    return KOHYA_PREFIX + diffusers_path.replace(".", "_")


def to_kohya(
    tensors: Mapping[str, Tensor],
    settings: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    *,
    prefix: str = "",
) -> dict[str, Tensor]:
    """kohya sd-scripts' SD 1.x / 2.x names, with each layer's alpha as a scalar."""
    tensors = _unet_only(tensors, prefix)
    out = {}
    for layer in _layers(tensors):
        down = tensors[f"{layer}.lora_down.weight"]
        name = _kohya_name(unet_module_path(layer, unet_config))
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = tensors[f"{layer}.lora_up.weight"]
        out[f"{name}.alpha"] = torch.tensor(_alpha(settings, down))
    return out


def from_kohya(state_dict: Mapping[str, Tensor], unet: nn.Module) -> dict[str, Tensor]:
    """Our tensors (with per-layer ``{path}.alpha``) from kohya names, resolved against the
    UNet's own layers (underscores alone are ambiguous)."""
    names = {}
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and path:
            try:
                names[_kohya_name(unet_module_path(path, unet.config))] = path
            except ValueError:
                continue
    out, unknown = {}, []
    for key, value in state_dict.items():
        name, _, leaf = key.partition(".")
        if name not in names:
            unknown.append(key)
            continue
        out[f"{names[name]}.{leaf}"] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} kohya key(s) match no UNet layer: {', '.join(unknown[:10])}"
        )
    return out


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Adapter ``name`` of ``model`` in our format: safetensors, its settings (rank, alpha
    per layer kind) in the metadata; written atomically."""
    settings = adapter_settings(model).get(name)
    info = {
        "format": "ldm-lora",
        "settings": asdict(settings) if settings else None,
        **(metadata or {}),
    }
    return save_safetensors(
        path, adapter_state_dict(model, name), {"ldm_lora": json.dumps(info, default=str)}
    )


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, info) of an adapter file written by ``save_adapter``; load the tensors
    with ``ldm.nn.lora.load_adapter(model, tensors, name, info["settings"])``."""
    tensors, meta = read_safetensors(path)
    if "ldm_lora" not in meta:
        raise WeightsFileError(
            f"{path} is not an ldm adapter (no 'ldm_lora' metadata); diffusers / PEFT and kohya "
            "files load through read_any"
        )
    return tensors, json.loads(meta["ldm_lora"])


def read_any(path: str, denoiser: nn.Module | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors in our format, keyed from the networks: ``denoiser.{path}...``, settings) of
    an adapter file in our, the diffusers / PEFT, or the kohya format (told apart by keys;
    the last two are UNet formats: ``denoiser`` names the UNet's layers)."""
    tensors, metadata = read_safetensors(path)
    if "ldm_lora" in metadata:
        info = json.loads(metadata["ldm_lora"])
        return legacy_names(tensors), info.get("settings") or {}
    foreign = any(k.startswith(KOHYA_PREFIX) for k in tensors) or any(
        k.startswith("unet.") and ".lora_A." in k for k in tensors
    )
    if foreign and not isinstance(denoiser, UNet):
        raise WeightsFileError(
            f"{path} is a diffusers / kohya UNet LoRA; this model's denoiser is a "
            f"{type(denoiser).__name__}: use an adapter trained on it (ldm's format)"
        )
    if any(k.startswith(KOHYA_PREFIX) for k in tensors):
        return {f"denoiser.{k}": v for k, v in from_kohya(tensors, denoiser).items()}, {}
    if foreign:
        ours, settings = from_diffusers(tensors, metadata, denoiser.config)
        return {f"denoiser.{k}": v for k, v in ours.items()}, settings
    raise WeightsFileError(
        f"{path}: not a LoRA file this framework reads (ours, diffusers / PEFT 'unet.*.lora_A', "
        "or kohya 'lora_unet_*')"
    )


def split_spec(spec: str) -> tuple[str, float]:
    """An adapter given as ``path[:weight]`` -> (path, weight); the weight defaults to 1."""
    match = re.fullmatch(r"(.+?)(?::([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?", spec)
    return match.group(1), float(match.group(2) or 1.0)
