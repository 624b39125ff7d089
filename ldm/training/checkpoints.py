"""Finding and reading training checkpoints: ``resume=auto``, frozen VAEs for the
diffusion stage, and the configuration a checkpoint was trained with.

Every pickle is read with ``torch.load(weights_only=True)``: our checkpoints hold tensors
and plain containers only (the resolved config is a YAML string in them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.convert.diffusers_vae import vae_config_from_diffusers, vae_from_diffusers
from ldm.convert.stable_diffusion import PREFIXES, infer_vae_config, weights_file
from ldm.io import (
    WeightsFileError,
    load_into,
    read_json,
    read_metadata,
    read_pickle,
    read_weights,
)
from ldm.models.vae import SD_VAE_SCALE, AutoencoderKL

CONFIG_KEY = "ldm_config"  # the resolved training config, as YAML, inside our checkpoints


def resolve_resume(resume: str | None, run_dir: str | Path) -> str | None:
    """``None`` / ``"never"``: start fresh; ``"auto"``: ``<run_dir>/checkpoints/last.ckpt``
    when it exists; anything else: that checkpoint, which must exist. The file is read once
    here, so a truncated or corrupt one is one clear error before training starts."""
    if resume in (None, "never", ""):
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None
        resume = str(last)
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint")
    load_checkpoint(resume)
    return str(resume)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of ours, loaded with ``weights_only=True``."""
    state = read_pickle(path)
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    return state


def read_ours(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint of ours as a dict with ``state_dict`` (and ``ldm_config`` /
    ``vae_config`` when it has them): a Lightning ``.ckpt`` of ours, or a ``.safetensors``
    that carries our config (merged or exported); None for anything else."""
    path = Path(path)
    if path.suffix == ".ckpt":
        state = load_checkpoint(path)
        return (
            state
            if "state_dict" in state
            and any(k.startswith(("networks.", "vae.")) for k in state["state_dict"])
            else None
        )
    if path.suffix == ".safetensors" and path.is_file():
        meta = read_metadata(path)
        if CONFIG_KEY in meta:
            state: dict[str, Any] = {"state_dict": read_weights(path), CONFIG_KEY: meta[CONFIG_KEY]}
            if "vae_config" in meta:
                state["vae_config"] = json.loads(meta["vae_config"])
            return state
    return None


def load_vae(
    path: str | Path,
    *,
    scale_factor: float | None = None,  # overrides what the file says (or does not say)
    strict: bool = True,
) -> AutoencoderKL:
    """A frozen ``AutoencoderKL`` from any of:

    * a checkpoint of our VAE or diffusion stage (``.ckpt``; its config and latent scale);
    * a ``.safetensors`` with ``vae_config`` metadata (our exports, ``ldm.convert``);
    * an original Stable Diffusion single file (``first_stage_model.*``; scale 0.18215);
    * a diffusers folder (a pipeline with ``vae/``, or a VAE folder with config.json).
    """
    path = Path(path)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path} is neither a diffusers VAE folder nor holds vae/")
        vae = _diffusers_vae(folder, strict)
    else:
        state = read_ours(path) or {}
        ours = {k[4:]: v for k, v in state.get("state_dict", {}).items() if k.startswith("vae.")}
        if ours:
            vae = AutoencoderKL(**(state.get("vae_config") or infer_vae_config(ours)))
            load_into(vae, ours, strict=strict, what=f"VAE of {path}")
        else:
            vae = _from_tensors(path, read_weights(path), strict)
    if scale_factor is not None:
        vae.scale_factor = scale_factor
    return vae.eval().requires_grad_(False)


def _diffusers_vae(folder: Path, strict: bool) -> AutoencoderKL:
    vae = AutoencoderKL(**vae_config_from_diffusers(read_json(folder / "config.json")))
    load_into(
        vae,
        vae_from_diffusers(read_weights(weights_file(folder))),
        strict=strict,
        what=str(folder),
    )
    return vae


def _from_tensors(path: Path, tensors: dict[str, torch.Tensor], strict: bool) -> AutoencoderKL:
    config = None
    metadata = read_metadata(path)
    if "vae_config" in metadata:
        config = json.loads(metadata["vae_config"])
    prefix = PREFIXES["vae"]
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if config is None:  # an original SD file: its VAE's scale is SD's
            config = infer_vae_config(tensors) | {"scale_factor": SD_VAE_SCALE}
    if "encoder.conv_in.weight" not in tensors:
        raise WeightsFileError(f"{path} holds no VAE (no first_stage_model.* or encoder.* weights)")
    vae = AutoencoderKL(**(config or infer_vae_config(tensors)))
    load_into(vae, tensors, strict=strict, what=f"VAE of {path}")
    return vae
