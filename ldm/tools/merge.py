"""``python -m ldm.tools.merge method=... inputs=[...] out=...``: merge checkpoints.

* ``weighted``: ``sum_i w_i * checkpoint_i`` (weights default to equal shares);
* ``add_difference``: ``A + alpha * (B - C)`` (e.g. a style's fine-tune minus its base,
  added to another model);
* ``bake``: LoRA adapters (``path[:weight]``; ours, diffusers / PEFT or kohya) folded into
  a base checkpoint's weights (and its EMA copy).

Inputs are our ``.ckpt`` / ``.safetensors`` files, merged outputs, or original SD single
files; they must hold the same tensors with the same shapes (different architectures are
refused, naming what differs). Floating-point tensors are merged in float32; others come
from the first input. The output is a safetensors file with the provenance (method,
inputs with their SHA-256 and weights, alpha, adapters) in its metadata, and the first
input's training config when it had one, so ``sample.py`` and ``base=`` read it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.convert.lora import read_any, split_spec
from ldm.io import WeightsFileError, file_digest, read_metadata, save_safetensors
from ldm.nn.lora import layer_alpha, low_rank_delta
from ldm.pipeline import CONFIG_KEY, open_checkpoint

METHODS = ("weighted", "add_difference", "bake")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, carried metadata: training config / VAE config) of a checkpoint."""
    checkpoint = open_checkpoint(path)
    if checkpoint.format == "diffusers":
        raise WeightsFileError(f"{path} is a diffusers folder: merge single files")
    carried = {k: v for k, v in checkpoint.metadata.items() if k in (CONFIG_KEY, "vae_config")}
    return checkpoint.tensors, carried


def _check_compatible(states: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
    for state, name in zip(states, names, strict=True):
        if any(".lora." in k for k in state):
            raise ValueError(
                f"{name} holds LoRA adapters: averaging their down and up matrices apart is "
                "not averaging the adapters. Bake them in first (method=bake), or merge the "
                "base checkpoints and load the adapters with sample.py adapters=[...]"
            )
    first = states[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        shapes = [
            f"{k} {tuple(first[k].shape)} vs {tuple(state[k].shape)}"
            for k in first
            if k in state and first[k].shape != state[k].shape
        ]
        if missing or extra or shapes:
            parts = [
                f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("extra", extra),
                    ("different shapes", shapes),
                )
                if items
            ]
            raise ValueError(
                f"{name} does not fit {names[0]} (different architectures?): " + "; ".join(parts)
            )


def weighted_sum(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} checkpoints but {len(weights)} weights")
    out = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            total = sum(w * s[key].float() for w, s in zip(weights, states, strict=True))
            out[key] = total.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def add_difference(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], c: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    return {
        k: (v.float() + alpha * (b[k].float() - c[k].float())).to(v.dtype)
        if v.is_floating_point()
        else v.clone()
        for k, v in a.items()
    }


def _targets(state: Mapping[str, Tensor], layer: str) -> list[str]:
    """Where adapter layer ``denoiser.{path}`` / ``conditioner.{path}`` lives in a
    checkpoint."""
    part, _, path = layer.partition(".")
    candidates = [f"networks.{part}.{path}.weight", f"ema.average.{part}.{path}.weight"]
    if part == "denoiser":
        candidates += [f"model.diffusion_model.{path}.weight", f"{path}.weight"]
    return [k for k in candidates if k in state]


def bake(
    state: Mapping[str, Tensor],
    adapters: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Any], float]],
) -> dict[str, Tensor]:
    """``W += weight * alpha / rank * up @ down`` for every adapter layer (EMA copies too)."""
    out = dict(state)
    for tensors, settings, weight in adapters:
        layers = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
        for layer in layers:
            down = tensors[f"{layer}.lora_down.weight"]
            scale = weight * layer_alpha(tensors, layer, settings) / down.shape[0]
            delta = low_rank_delta(down, tensors[f"{layer}.lora_up.weight"], scale)
            targets = _targets(out, layer)
            if not targets:
                raise ValueError(f"adapter layer {layer} has no weight in the base checkpoint")
            for key in targets:
                out[key] = (out[key].float() + delta).to(out[key].dtype)
    return out


def _adapter(spec: str, base: Mapping[str, Tensor]) -> tuple[dict, dict, float]:
    from ldm.convert.stable_diffusion import infer_unet_config
    from ldm.models.unet import UNet

    path, weight = split_spec(spec)
    ours = "ldm_lora" in read_metadata(path)
    unet = None
    if not ours:  # other formats name layers by the UNet's shape: build it, on meta
        prefix = next(
            (
                p
                for p in ("networks.denoiser.", "model.diffusion_model.", "")
                if any(k.startswith(p + "input_blocks.0.0") for k in base)
            ),
            None,
        )
        if prefix is None:
            raise ValueError(
                f"{path} is a diffusers / kohya UNet LoRA, and the base checkpoint has no "
                "UNet: bake adapters of a DiT or MMDiT in ldm's format"
            )
        unet_state = {k[len(prefix) :]: v for k, v in base.items() if k.startswith(prefix)}
        with torch.device("meta"):
            unet = UNet(**infer_unet_config(unet_state))
    tensors, settings = read_any(path, unet)
    return tensors, settings, weight


def merge(
    method: str,
    inputs: Sequence[str],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 1.0,
    adapters: Sequence[str] = (),
) -> Path:
    """Merge ``inputs`` into ``out`` (safetensors with provenance); returns its path."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {METHODS}")
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
    loaded = [read_checkpoint(p) for p in paths]
    states = [s for s, _ in loaded]
    provenance: dict[str, Any] = {"method": method, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if method == "weighted":
        if len(states) < 2:
            raise ValueError("a weighted merge needs at least two inputs")
        weights = list(weights) if weights else [1.0 / len(states)] * len(states)
        _check_compatible(states, [str(p) for p in paths])
        merged = weighted_sum(states, weights)
    elif method == "add_difference":
        if len(states) != 3:
            raise ValueError("add_difference takes three inputs: A B C (A + alpha * (B - C))")
        _check_compatible(states, [str(p) for p in paths])
        merged, provenance["alpha"] = add_difference(*states, alpha), alpha
        weights = None
    else:
        if len(states) != 1 or not adapters:
            raise ValueError("bake takes one base input and at least one adapter")
        merged = bake(states[0], [_adapter(a, states[0]) for a in adapters])
        provenance["adapters"] = [
            {"path": path, "weight": weight, "sha256": file_digest(path)}
            for path, weight in map(split_spec, adapters)
        ]
        weights = None
    provenance["inputs"] = [
        {"path": str(p), "sha256": file_digest(p), **({"weight": w} if weights else {})}
        for p, w in zip(paths, weights or [None] * len(paths), strict=True)
    ]
    metadata = {"ldm_merge": json.dumps(provenance), **loaded[0][1]}
    return save_safetensors(out, merged, metadata)


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.merge import main

    main()
