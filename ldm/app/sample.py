"""The body of ``sample.py``: a model from a checkpoint, prompts in, PNGs and a grid out.

Checkpoints are read through ``open_checkpoint``: ours (``.ckpt`` from ``train.py``,
which carries its training config, the VAE and the EMA weights), an original Stable
Diffusion single file (UNet, VAE and text-tower shapes read from the weights; the text
tower's preset from its keys unless ``model/conditioner`` says), or a diffusers folder
(``unet/`` and ``vae/``; the text tower from ``model/conditioner``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm import CONF_DIR
from ldm.app import CONFIG_PATH, reported
from ldm.convert.lora import read_any, split_spec
from ldm.io import WeightsFileError
from ldm.models.textual_inversion import load_embeddings
from ldm.nn.lora import load_adapter, merge_adapters
from ldm.pipeline import Checkpoint, Pipeline, open_checkpoint, step_generators
from ldm.training.checkpoints import load_vae
from ldm.training.speed import compile_network

log = logging.getLogger(__name__)


def load_model(cfg: DictConfig, checkpoint: Checkpoint | None = None) -> Pipeline:
    """The pipeline of the model ``cfg.checkpoint`` names (or of ``checkpoint``, opened
    already), with ``cfg.vae``, ``cfg.adapters`` and ``cfg.embeddings``, on ``cfg.device``
    in ``cfg.precision`` (compiled with ``cfg.compile``), in eval mode. Our checkpoints
    bring their schedule and conditioner: ``cfg.diffusion`` and ``cfg.model`` are for the
    other formats."""
    checkpoint = checkpoint or open_checkpoint(cfg.checkpoint)
    given = {}
    if checkpoint.format != "ours":
        given = dict(
            conditioner=_text_encoder(cfg, checkpoint),
            schedule=instantiate(cfg.diffusion.schedule),
            prediction=cfg.diffusion.prediction,
        )
    pipeline = Pipeline.from_checkpoint(checkpoint, ema=cfg.ema, image_size=cfg.image_size, **given)
    if cfg.get("posthoc_ema") is not None:  # an EMA length chosen after training (before
        use_posthoc_ema(pipeline, cfg, cfg.posthoc_ema)  # added tokens and adapters)
    if cfg.get("vae"):  # another decoder of the same latents (a decoder fine-tune)
        pipeline.swap_vae(load_vae(cfg.vae))
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
    pipeline.to("cpu" if device == "auto" else device, dtype=cfg.get("precision"))
    compile_network(pipeline.denoiser, cfg.get("compile"))
    return pipeline.eval()


def _text_encoder(cfg: DictConfig, checkpoint: Checkpoint) -> torch.nn.Module:
    """``model/conditioner`` when given, else the preset the file's text tower implies."""
    spec = OmegaConf.select(cfg, "model.conditioner")
    if spec is None:
        preset = checkpoint.text_encoder
        if preset is None:
            raise WeightsFileError(
                f"{checkpoint.path} holds no text encoder this framework recognises: choose "
                "one with model/conditioner=openclip_vit_l (SD 1.x) or openclip_vit_h (SD 2.x)"
            )
        spec = OmegaConf.load(CONF_DIR / "model" / "conditioner" / f"{preset}.yaml")
        log.info("text encoder: model/conditioner=%s (from %s's keys)", preset, checkpoint.path)
    return instantiate(spec)


def load_lora(pipeline: Pipeline, spec: str, name: str) -> list[str]:
    """Load ``path[:weight]`` (ours, diffusers / PEFT or kohya format) as adapter ``name``
    into the pipeline's networks."""
    path, weight = split_spec(spec)
    networks = pipeline.networks()
    tensors, settings = read_any(path, networks["denoiser"])
    return load_adapter(networks, tensors, name, settings, weight=weight)


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = [str(p) for p in cfg.prompts or []]  # prompts=[3]: class 3, as "3"
    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give prompts=[...] or prompts_file=<one prompt per line>")
    return prompts


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "empty"


def use_posthoc_ema(pipeline: Pipeline, cfg: DictConfig, sigma_rel: float) -> dict[str, Any]:
    """Put the post-hoc EMA of length ``sigma_rel`` (reconstructed from the snapshots in
    ``cfg.posthoc_ema_dir``, default ``<run>/posthoc_ema`` beside the checkpoint's folder)
    into the pipeline's trained networks."""
    from ldm.training.posthoc_ema import load_posthoc

    folder = cfg.get("posthoc_ema_dir") or Path(cfg.checkpoint).parent.parent / "posthoc_ema"
    about = load_posthoc(pipeline.networks(), folder, float(sigma_rel))
    log.info(
        "post-hoc EMA sigma_rel %g at step %d from %d snapshots (profile fit error %.2g)",
        sigma_rel, about["step"], about["snapshots"], about["fit_error"],
    )  # fmt: skip
    return about


def sample(cfg: DictConfig, out_dir: str | Path) -> list[Path]:
    """Sample every prompt ``cfg.num_per_prompt`` times; write PNGs, ``grid.png`` and
    ``settings.json`` into ``out_dir``; returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_model(cfg)
    sampler = instantiate(cfg.sampler)
    prompts = read_prompts(cfg)
    jobs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.num_per_prompt)]
    labels = getattr(pipeline.conditioner, "input_key", None) == "label"
    if labels:  # a class-conditional model: every prompt a class number
        classes = pipeline.conditioner.num_classes
        for prompt in prompts:
            if not (re.fullmatch(r"\d+", prompt) and int(prompt) < classes):
                raise ValueError(
                    f"prompt {prompt!r}: this model is class-conditional; give class numbers "
                    f"0..{classes - 1} as prompts (e.g. prompts=[3])"
                )
    elif hasattr(pipeline.conditioner, "token_count"):  # said, not cut silently
        limit = pipeline.conditioner.max_length
        for prompt in dict.fromkeys(prompts):
            if (count := pipeline.conditioner.token_count(prompt)) > limit:
                log.warning("prompt %r is %d tokens; the model reads %d: cut", prompt, count, limit)
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
                negative=[cfg.negative_prompt] * len(chunk) if cfg.negative_prompt else None,
                seeds=[s for _, s in chunk],
                # step noise per image too: no image depends on its batch
                generator=step_generators([s for _, s in chunk], pipeline.device),
            ).cpu()
        )
    seconds = time.perf_counter() - start
    from torchvision.utils import make_grid, save_image  # 3 s: not on the server's start

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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
@reported()  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    """``python -m ldm.sample``: sample a trained model (conf/sample.yaml)."""
    sample(cfg, HydraConfig.get().runtime.output_dir)
