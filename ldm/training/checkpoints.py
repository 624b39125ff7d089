"""Finding and reading training checkpoints: ``resume=auto`` and frozen VAEs for the
diffusion stage (every file through ``ldm.pipeline.open_checkpoint`` / ``ldm.io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.io import WeightsFileError, read_pickle
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import open_checkpoint


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


def load_vae(
    path: str | Path,
    *,
    scale_factor: float | None = None,  # overrides what the file says (or does not say)
    strict: bool = True,
) -> AutoencoderKL:
    """A frozen ``AutoencoderKL`` from any checkpoint ``open_checkpoint`` reads: ours (VAE
    or diffusion stage), a ``.safetensors`` with ``vae_config`` metadata, an original SD
    single file (scale 0.18215) or a diffusers folder (a pipeline or a VAE folder)."""
    vae = open_checkpoint(path).vae(strict=strict)
    if vae is None:
        raise WeightsFileError(f"{path} holds no VAE (no first_stage_model.* or encoder.* weights)")
    if scale_factor is not None:
        vae.scale_factor = scale_factor
    return vae
