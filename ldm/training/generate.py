"""The body of ``sample.py``: a model from a checkpoint, prompts in, PNGs and a grid out.

Checkpoints: ours (``.ckpt`` from ``train.py``, which carries its training config, the
VAE and the EMA weights), an original Stable Diffusion single file (``.safetensors`` /
``.ckpt``: UNet and VAE shapes are read from the weights; the text tower comes from
``model/conditioner`` and, for SD 2.x, its weights from the same file), or a diffusers
folder (``unet/`` and ``vae/``; the text tower from ``model/conditioner``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from ldm.convert.lora import read_any, split_spec
from ldm.convert.stable_diffusion import (
    infer_unet_config,
    infer_vae_config,
    load_diffusers_folder,
    split_checkpoint,
)
from ldm.io import WeightsFileError, load_into, read_weights
from ldm.models.textual_inversion import load_embeddings
from ldm.models.unet import UNet
from ldm.models.vae import SD_VAE_SCALE, AutoencoderKL
from ldm.nn.lora import load_adapter, merge_adapters
from ldm.pipeline import Pipeline
from ldm.seeding import stable_seed
from ldm.training.checkpoints import CONFIG_KEY, read_ours
from ldm.training.diffusion import LatentDiffusion
from ldm.training.finetune import apply_lora, apply_textual_inversion


def _ours(path: Path, state: dict[str, Any], use_ema: bool) -> LatentDiffusion:
    saved = OmegaConf.create(state[CONFIG_KEY])
    if saved.task_name != "ldm":
        raise ValueError(
            f"{path} is a {saved.task_name} checkpoint; sampling needs a diffusion one"
        )
    vae = AutoencoderKL(**state["vae_config"]) if "vae_config" in state else None
    module = instantiate(saved.task, vae=vae, optimizer=None, lr_scheduler=None)
    # Rebuild what fine-tuning added (adapters, tokens, the EMA of the trained parts) so
    # that the state dict fits; the values then come from it.
    if saved.get("lora"):
        apply_lora(module, saved.lora)
    if saved.get("textual_inversion"):
        apply_textual_inversion(module, saved.textual_inversion)
    load_into(module, state["state_dict"], what=str(path))
    if vae is not None:
        vae.scale_factor = state["vae_config"]["scale_factor"]
    if not use_ema and module.ema is not None:
        module.ema = None  # sample with the raw weights
    return module


def _stable_diffusion(path: Path, cfg: DictConfig) -> LatentDiffusion:
    conditioner = instantiate(cfg.model.conditioner) if cfg.model.get("conditioner") else None
    if path.is_dir():
        models = load_diffusers_folder(path)
        unet, vae = models["unet"], models.get("vae")
    else:
        split = split_checkpoint(read_weights(path))
        unet = UNet(**infer_unet_config(split.parts["unet"]))
        load_into(unet, split.parts["unet"], what=f"UNet of {path}")
        vae = None
        if split.parts["vae"]:
            vae = AutoencoderKL(
                **infer_vae_config(split.parts["vae"]) | {"scale_factor": SD_VAE_SCALE}
            )
            load_into(vae, split.parts["vae"], what=f"VAE of {path}")
        if conditioner is not None and split.parts["text"] and hasattr(conditioner, "model"):
            conditioner.load_text_state(split.parts["text"], what=f"text encoder of {path}")
    if vae is None:
        raise WeightsFileError(f"{path} holds no VAE; sampling needs one")
    return LatentDiffusion(
        unet,
        conditioner,
        vae,
        schedule=instantiate(cfg.diffusion.schedule),
        prediction=cfg.diffusion.prediction,
        optimizer=None,
        ema_decay=None,
        image_size=cfg.image_size or 512,
    )


def load_model(cfg: DictConfig) -> Pipeline:
    """The pipeline of the model ``cfg.checkpoint`` names (with ``cfg.adapters`` and
    ``cfg.embeddings``), on ``cfg.device``, in eval mode."""
    path = Path(cfg.checkpoint)
    state = read_ours(path) or {}
    if state.get(CONFIG_KEY):
        module = _ours(path, state, cfg.ema)
    elif path.exists():
        module = _stable_diffusion(path, cfg)
    else:
        raise FileNotFoundError(f"checkpoint={path}: no such file or folder")
    if cfg.image_size:
        size = cfg.image_size
        module.image_size = (size, size) if isinstance(size, int) else tuple(size)
    pipeline = module.pipeline()
    for path in cfg.get("embeddings") or []:  # textual-inversion tokens
        load_embeddings(pipeline.conditioner, path)
    for index, spec in enumerate(cfg.get("adapters") or []):  # LoRA files
        load_lora(pipeline, str(spec), f"lora{index}")
    if cfg.get("adapters") and cfg.get("adapters_merge"):
        merge_adapters(pipeline.networks())
    if cfg.get("exact_denoiser"):  # the network's place taken by its data's exact denoiser
        from ldm.studies.exact_latents import use_exact_denoiser

        pipeline = use_exact_denoiser(pipeline, cfg.exact_denoiser)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    return pipeline.to("cpu" if device == "auto" else device).eval()


def load_lora(pipeline: Pipeline, spec: str, name: str) -> list[str]:
    """Load ``path[:weight]`` (ours, diffusers / PEFT or kohya format) as adapter ``name``
    into the pipeline's networks."""
    path, weight = split_spec(spec)
    networks = pipeline.networks()
    tensors, settings = read_any(path, networks["unet"])
    return load_adapter(networks, tensors, name, settings, weight=weight)


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompts or [])
    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give prompts=[...] or prompts_file=<one prompt per line>")
    return prompts


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "empty"


def sample(cfg: DictConfig, out_dir: str | Path) -> list[Path]:
    """Sample every prompt ``cfg.num_per_prompt`` times; write PNGs, ``grid.png`` and
    ``settings.json`` into ``out_dir``; returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_model(cfg)
    sampler = instantiate(cfg.sampler)
    prompts = read_prompts(cfg)
    jobs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.num_per_prompt)]
    labels = (
        all(re.fullmatch(r"\d+", p) for p in prompts)
        and getattr(pipeline.conditioner, "input_key", None) == "label"
    )
    start, images = time.perf_counter(), []
    for first in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[first : first + cfg.batch_size]
        texts = [p for p, _ in chunk]
        inputs: Any = (
            torch.tensor([int(p) for p in texts], device=pipeline.device) if labels else texts
        )
        images.append(
            pipeline.generate(
                inputs,
                sampler,
                guidance_scale=cfg.guidance_scale,
                guidance_rescale=cfg.guidance_rescale,
                seeds=[s for _, s in chunk],
                generator=[  # step noise per image too: no image depends on its batch
                    torch.Generator(pipeline.device).manual_seed(stable_seed(s, "sampler noise"))
                    for _, s in chunk
                ],
            ).cpu()
        )
    seconds = time.perf_counter() - start
    batch = torch.cat(images) * 0.5 + 0.5  # (N, 3, H, W) in [0, 1]
    paths = []
    for index, ((prompt, seed), image) in enumerate(zip(jobs, batch, strict=True)):
        path = out_dir / f"{index:04d}_{slug(prompt)}_seed{seed}.png"
        save_image(image, path)
        paths.append(path)
    save_image(make_grid(batch, nrow=cfg.num_per_prompt, padding=2), out_dir / "grid.png")
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings["images"] = [
        {"file": p.name, "prompt": j[0], "seed": j[1]} for p, j in zip(paths, jobs, strict=True)
    ]
    settings["seconds"] = round(seconds, 3)
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(paths)} images and grid.png to {out_dir} ({seconds:.1f} s sampling)")
    return paths
