"""Fine-tuning a trained model: base weights in, LoRA adapters on, only adapters trained.

``load_base`` fills a ``LatentDiffusion``'s networks from a checkpoint of ours (its EMA
weights when it kept them), an original SD single file or a diffusers folder.
``apply_lora`` freezes every network weight, injects adapters into the UNet (and, if
asked, the text encoder) and leaves only the adapters trainable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.convert.stable_diffusion import load_diffusers_folder, split_checkpoint
from ldm.io import load_into, read_weights
from ldm.nn.lora import LoRASettings, adapter_parameters, inject_lora
from ldm.training.checkpoints import CONFIG_KEY, read_ours
from ldm.training.ema import EMA

log = logging.getLogger(__name__)


# What a base model and its fine-tuning must agree on (else the weights learn a new task).
DIFFUSION_KEYS = (
    "prediction",
    "schedule.name",
    "schedule.num_train_timesteps",
    "schedule.zero_terminal_snr",
)


def restart_ema(module: nn.Module) -> None:
    """Start a module's EMA (if it keeps one) afresh from its current networks."""
    if getattr(module, "ema", None) is not None:
        module.ema = EMA(module._trainable(), module.ema.decay, module.ema.warmup)


def load_base(
    module: nn.Module, path: str | Path, diffusion: Mapping[str, Any] | None = None
) -> list[str]:
    """Load base weights into ``module.networks`` and restart its EMA from them; returns
    the networks that got some. ``diffusion`` (the run's diffusion config) must match a
    base of ours on DIFFUSION_KEYS."""
    loaded = _load_base(module, Path(path), diffusion)
    restart_ema(module)  # else the average would start from the random initialisation
    return loaded


def _load_base(module: nn.Module, path: Path, diffusion: Mapping[str, Any] | None) -> list[str]:
    networks: nn.ModuleDict = module.networks
    loaded = []
    if path.is_dir():
        load_into(
            networks["unet"], load_diffusers_folder(path)["unet"].state_dict(), what=str(path)
        )
        return ["unet"]
    state = read_ours(path) or {}
    if diffusion is not None and state.get(CONFIG_KEY):
        _check_diffusion(OmegaConf.create(state[CONFIG_KEY]).diffusion, diffusion, path)
    if any(k.startswith("networks.") for k in state.get("state_dict", {})):
        weights = state["state_dict"]
        for name, network in networks.items():
            source = (
                "ema.average."
                if any(k.startswith(f"ema.average.{name}.") for k in weights)
                else "networks."
            )
            prefix = f"{source}{name}."
            part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            if part:
                load_into(network, part, what=f"{name} of {path} ({source.rstrip('.')})")
                loaded.append(name)
        return loaded
    split = split_checkpoint(read_weights(path))
    load_into(networks["unet"], split.parts["unet"], what=f"UNet of {path}")
    loaded.append("unet")
    conditioner = module.conditioner
    if conditioner is not None and split.parts["text"] and hasattr(conditioner, "model"):
        conditioner.load_text_state(split.parts["text"], what=f"text encoder of {path}")
        loaded.append("conditioner")
    return loaded


def _check_diffusion(base: Any, run: Any, path: Path) -> None:
    base, run = OmegaConf.create(base), OmegaConf.create(run)
    for key in DIFFUSION_KEYS:
        want, got = OmegaConf.select(base, key), OmegaConf.select(run, key)
        if want != got:
            raise ValueError(
                f"base={path} was trained with diffusion.{key}={want}, this run has {got}: "
                f"fine-tuning would teach it a different task. Add diffusion.{key}={want}."
            )


def _targets(targets: Any) -> str | tuple[str, ...]:
    """A preset name, or patterns as a tuple (a Hydra list would be saved as its repr)."""
    return targets if isinstance(targets, str) else tuple(str(t) for t in targets)


def apply_lora(module: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Freeze ``module.networks`` and inject adapter ``cfg["name"]`` (rank, alpha, dropout,
    targets, conv_rank; ``text_encoder`` adds one to the conditioner with
    ``text_targets``). Returns what it did: layers, trainable and total parameters."""
    networks: nn.ModuleDict = module.networks
    networks.requires_grad_(False)
    name = cfg.get("name", "default")
    settings = LoRASettings(
        rank=cfg["rank"],
        alpha=cfg.get("alpha") or cfg["rank"],
        dropout=cfg.get("dropout", 0.0),
        targets=_targets(cfg.get("targets", "attn")),
        conv_rank=cfg.get("conv_rank"),
        conv_alpha=cfg.get("conv_alpha"),
    )
    layers = {"unet": inject_lora(networks["unet"], name, settings)}
    if cfg.get("text_encoder"):
        if "conditioner" not in networks:
            raise ValueError("lora.text_encoder=true, but the model has no conditioner")
        text = LoRASettings(
            **{**settings.__dict__, "targets": cfg.get("text_targets", "attn"), "conv_rank": None}
        )
        layers["conditioner"] = inject_lora(networks["conditioner"], name, text)
    networks.lora_settings = {name: settings}
    restart_ema(module)  # the average must hold the adapters too
    trainable = sum(p.numel() for p in adapter_parameters(networks, name))
    total = sum(p.numel() for p in networks.parameters())
    report = {
        "adapter": name,
        "layers": {k: len(v) for k, v in layers.items()},
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    log.info(
        "LoRA %r: %s layers; %s trainable of %s parameters (%.2f%%)",
        name,
        report["layers"],
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return report


@torch.no_grad()
def ensure_class_images(
    module: nn.Module,
    folder: str | Path,
    prompt: str,
    count: int,
    *,
    steps: int = 50,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    seed: int = 0,
) -> int:
    """Generate class images with the (base) model until ``folder`` holds ``count`` images
    (the user's own count too); returns how many were made. Image i is
    ``class_{i:05d}.png``, seeded by ``seed + i`` and written atomically, so an
    interrupted run resumes where it stopped and a re-run adds nothing."""
    from torchvision.utils import save_image

    from ldm.data.folder import list_images
    from ldm.diffusion.samplers import make_sampler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in list_images(folder)}
    needed = count - len(have)
    missing = [i for i in range(count) if f"class_{i:05d}.png" not in have][: max(needed, 0)]
    if not missing:
        return 0
    log.info("generating %d class images for %r into %s", len(missing), prompt, folder)
    first = next(module.parameters(), None)
    was_training, device = module.training, None if first is None else first.device
    if torch.cuda.is_available():  # before the Trainer places the model: use the GPU now
        module.cuda()
    module.eval()
    sampler, pipeline = make_sampler("ddim", steps=steps), module.pipeline()
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        images = pipeline.generate(
            [prompt] * len(chunk),
            sampler,
            guidance_scale=guidance_scale,
            seeds=[seed + i for i in chunk],
        )
        for index, image in zip(chunk, images, strict=True):
            tmp = folder / f".class_{index:05d}.{os.getpid()}.tmp.png"  # DDP ranks: same image
            save_image(image * 0.5 + 0.5, tmp)
            os.replace(tmp, folder / f"class_{index:05d}.png")
    module.train(was_training)
    if device is not None:
        module.to(device)
    return len(missing)


def apply_textual_inversion(module: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Freeze every network weight (LoRA adapters, when a ``lora`` is on too, stay
    trainable) and add ``cfg["tokens"]`` (initialised from ``cfg["init_words"]``) to the
    conditioner: the new embedding rows train."""
    from ldm.models.textual_inversion import add_tokens

    conditioner = module.conditioner
    if conditioner is None or not hasattr(conditioner, "tokenize"):
        raise ValueError("textual inversion needs a text conditioner")
    for name, parameter in module.networks.named_parameters():
        if ".lora." not in name:
            parameter.requires_grad_(False)
    tokens, words = list(cfg["tokens"]), list(cfg["init_words"])
    ids = add_tokens(conditioner, tokens, init_words=words)
    restart_ema(module)
    trainable = sum(p.numel() for p in module.networks.parameters() if p.requires_grad)
    log.info(
        "textual inversion: tokens %s (ids %s) from %s; %s trainable parameters",
        tokens,
        ids,
        words,
        trainable,
    )
    return {"tokens": tokens, "ids": ids, "trainable_parameters": trainable}
