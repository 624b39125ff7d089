"""``python -m ldm.convert``: inspect and convert Stable Diffusion weights (conf/convert.yaml).

    python -m ldm.convert action=inspect src=model.safetensors
    python -m ldm.convert action=to-diffusers src=model.safetensors out=out_dir/  (or our .ckpt)
    python -m ldm.convert action=from-diffusers src=pipeline_dir/ out=model.safetensors
    python -m ldm.convert action=prune src=run/checkpoints/last.ckpt out=model.safetensors

``to-diffusers`` takes an SD single file or one of ours (UNet, DiT or MMDiT: ``unet/`` or
``transformer/``, and ``vae/``). Our UNet uses the original layout, so ``from-diffusers``
writes a single file that original-layout tools load too; the constructor configs go into
its metadata. A diffusers DiT / SD3 folder has no single-file form: every tool reads the
folder itself (``checkpoint=<folder>``). ``prune`` keeps of one of our training checkpoints
what sampling reads (its EMA weights, or the trained ones with ``ema=false``, the VAE and
the training config): a fraction of the file, the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm.app import CONFIG_PATH, reported
from ldm.convert.stable_diffusion import (
    PREFIXES,
    diffusers_form,
    infer_unet_config,
    infer_vae_config,
    save_diffusers_folder,
    split_checkpoint,
)
from ldm.io import WeightsFileError, file_digest, save_safetensors
from ldm.models.unet import UNet
from ldm.models.vae import SD_VAE_SCALE
from ldm.pipeline import open_checkpoint


def _inspect(path: Path) -> None:
    checkpoint = open_checkpoint(path)
    if checkpoint.format == "diffusers":
        for name, model in (("denoiser", checkpoint.denoiser()), ("vae", checkpoint.vae())):
            if model is not None:
                count = sum(p.numel() for p in model.parameters())
                print(f"{name}: {count:,} parameters, config {json.dumps(model.config)}")
        return
    if checkpoint.format != "stable-diffusion":  # ours, or bare weights
        print(f"format: {checkpoint.format}; task: {checkpoint.task}; EMA: {checkpoint.has_ema}")
        for part in ("denoiser", "conditioner", "vae"):
            weights = checkpoint.weights(part)
            if weights:
                count = sum(v.numel() for v in weights.values())
                print(f"{part}: {len(weights)} tensors, {count:,} values")
        print(f"LoRA adapters: {checkpoint.adapters}; TI tokens: {checkpoint.embeddings}")
        return
    split = split_checkpoint(checkpoint.tensors)
    for name, part in split.parts.items():
        count = sum(v.numel() for v in part.values())
        print(f"{name} ({PREFIXES[name]}*): {len(part)} tensors, {count:,} values")
    print(f"unet config: {json.dumps(infer_unet_config(split.parts['unet']))}")
    if split.parts["vae"]:
        print(f"vae config: {json.dumps(infer_vae_config(split.parts['vae']))}")
    if checkpoint.text_encoder:
        print(f"text encoder: model/conditioner={checkpoint.text_encoder}")
    if split.other:
        shown = ", ".join(split.other[:10])
        print(f"not loaded ({len(split.other)}): {shown}{' ...' if len(split.other) > 10 else ''}")


def _to_diffusers(src: Path, out: Path, vae_scale_factor: float) -> None:
    checkpoint = open_checkpoint(src)
    if checkpoint.format not in ("stable-diffusion", "ours"):
        raise WeightsFileError(f"{src} is neither a Stable Diffusion single file nor ours")
    if checkpoint.adapters:
        raise WeightsFileError(
            f"{src} holds LoRA adapters: bake them in first (python -m ldm.tools.merge "
            "method=bake), or export the adapter on its own"
        )
    vae = checkpoint.vae()
    if vae is not None and checkpoint.format == "stable-diffusion":
        vae.scale_factor = vae_scale_factor
    denoiser = checkpoint.denoiser()
    save_diffusers_folder(out, denoiser=denoiser, vae=vae)
    folder = diffusers_form(denoiser).folder
    print(f"wrote {out}/{folder}" + (f" and {out}/vae" if vae is not None else ""))
    if checkpoint.weights("conditioner"):
        print("the text encoder was not converted: diffusers keeps it in transformers' layout")


def _from_diffusers(src: Path, out: Path) -> None:
    checkpoint = open_checkpoint(src)
    if checkpoint.format != "diffusers":
        raise WeightsFileError(f"{src} is not a diffusers folder")
    denoiser = checkpoint.denoiser()
    if not isinstance(denoiser, UNet):
        raise WeightsFileError(
            f"{src} holds a {type(denoiser).__name__}, which has no single-file form: give "
            "the folder itself to sample.py / evaluate.py / train.py base="
        )
    models = {"unet": denoiser, "vae": checkpoint.vae()}
    tensors, metadata = {}, {}
    for name, model in models.items():
        if model is None:
            continue
        prefix = PREFIXES[name]
        tensors.update({prefix + k: v for k, v in model.state_dict().items()})
        metadata[f"{name}_config"] = json.dumps(model.config)
    save_safetensors(out, tensors, metadata)
    print(f"wrote {out} ({', '.join(k[:-7] for k in metadata)}; configs in its metadata)")


def _prune(src: Path, out: Path, ema: bool) -> None:
    checkpoint = open_checkpoint(src)
    if checkpoint.format != "ours":
        raise WeightsFileError(f"{src} is not a train.py checkpoint: action=prune takes ours")
    trained = any(k.startswith("networks.") for k in checkpoint.tensors)
    if ema and trained and not checkpoint.has_ema:
        raise WeightsFileError(f"{src} holds no EMA weights: pass ema=false to keep its own")
    tensors = {}
    for part in ("denoiser", "conditioner"):  # sampling reads networks.* when no EMA is left
        tensors.update(
            {f"networks.{part}.{k}": v for k, v in checkpoint.weights(part, ema).items()}
        )
    tensors.update({f"vae.{k}": v for k, v in checkpoint.weights("vae").items()})
    kind = "ema" if ema and trained else "trained"
    provenance = {"pruned_from": src.name, "source_sha256": file_digest(src), "weights": kind}
    save_safetensors(out, tensors, {**checkpoint.metadata, "ldm_prune": json.dumps(provenance)})
    size = sum(v.numel() * v.element_size() for v in tensors.values()) / 2**20
    print(f"wrote {out}: {len(tensors)} tensors, {size:.1f} MiB ({kind} weights, VAE, config)")


ACTIONS = ("inspect", "to-diffusers", "from-diffusers", "prune")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="convert")
@reported(ValueError)
def main(cfg: DictConfig) -> None:
    """``python -m ldm.convert action=... src=... [out=...]`` (conf/convert.yaml)."""
    if cfg.action not in ACTIONS:
        raise ValueError(f"action={cfg.action} is not one of {', '.join(ACTIONS)}")
    src = Path(cfg.src)
    if cfg.action == "inspect":
        _inspect(src)
        return
    if cfg.out is None:
        raise ValueError(f"action={cfg.action} writes to out=...; add it")
    if cfg.action == "to-diffusers":
        _to_diffusers(src, Path(cfg.out), cfg.vae_scale_factor or SD_VAE_SCALE)
    elif cfg.action == "prune":
        _prune(src, Path(cfg.out), cfg.ema)
    else:
        _from_diffusers(src, Path(cfg.out))
