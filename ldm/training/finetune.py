"""Fine-tuning a trained model: base weights in, LoRA adapters on, only adapters trained.

``load_base`` fills a ``LatentDiffusion``'s networks from a checkpoint of ours (its EMA
weights when it kept them), an original SD single file or a diffusers folder; the
autoencoder stage's VAE from any file ``load_vae`` reads.
``apply_lora`` freezes every network weight, injects adapters into the UNet (and, if
asked, the text encoder) and leaves only the adapters trainable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.io import load_into
from ldm.nn.lora import adapter_parameters, inject_from_config
from ldm.pipeline import open_checkpoint
from ldm.training.checkpoints import load_vae
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
    base of ours on DIFFUSION_KEYS. The autoencoder stage (a module with ``vae`` and no
    ``networks``) gets the file's VAE, which must have the run's ``model/vae`` shape."""
    if not hasattr(module, "networks"):
        state = load_vae(path).state_dict()
        load_into(module.vae, state, what=f"the VAE of {path} (match model/vae to it)")
        return ["vae"]
    loaded = _load_base(module, Path(path), diffusion)
    restart_ema(module)  # else the average would start from the random initialisation
    return loaded


def _load_base(module: nn.Module, path: Path, diffusion: Mapping[str, Any] | None) -> list[str]:
    networks: nn.ModuleDict = module.networks
    checkpoint = open_checkpoint(path)
    if diffusion is not None and checkpoint.config:
        _check_diffusion(checkpoint.config["diffusion"], diffusion, path)
    if checkpoint.format == "ours":  # every network it has, EMA weights when kept
        loaded = []
        for name, network in networks.items():
            part = checkpoint.weights(name, ema=True)
            if part:
                load_into(network, part, what=f"{name} of {path}")
                loaded.append(name)
        return loaded
    load_into(networks["denoiser"], checkpoint.weights("denoiser"), what=f"denoiser of {path}")
    text = hasattr(module.conditioner, "load_text_state") and checkpoint.weights("conditioner")
    if text:  # the file's text tower into the run's (SD 2.x: open_clip; SD 1.x: CLIP)
        checkpoint.conditioner(given=module.conditioner)
    return ["denoiser", "conditioner"] if text else ["denoiser"]


def _check_diffusion(base: Any, run: Any, path: Path) -> None:
    base, run = OmegaConf.create(base), OmegaConf.create(run)
    for key in DIFFUSION_KEYS:
        want, got = OmegaConf.select(base, key), OmegaConf.select(run, key)
        if want != got:
            raise ValueError(
                f"base={path} was trained with diffusion.{key}={want}, this run has {got}: "
                f"fine-tuning would teach it a different task. Add diffusion.{key}={want}."
            )


def apply_lora(module: nn.Module, **settings: Any) -> nn.Module:
    """The ``lora`` recipe (conf/lora/): freeze ``module.networks`` and inject the adapter
    ``settings`` describe (``ldm.nn.lora.inject_from_config``); only the adapter trains."""
    networks: nn.ModuleDict = module.networks
    networks.requires_grad_(False)
    name = settings.get("name") or "default"
    layers = inject_from_config(networks, settings)
    restart_ema(module)  # the average must hold the adapters too
    trainable = sum(p.numel() for p in adapter_parameters(networks, name))
    total = sum(p.numel() for p in networks.parameters())
    log.info(
        "LoRA %r: %s layers; %s trainable of %s parameters (%.2f%%)",
        name,
        {k: len(v) for k, v in layers.items()},
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return module


def prepare_dreambooth(
    module: nn.Module,
    *,
    class_dir: str | None,
    class_prompt: str | None,
    prior_loss_weight: float,
    class_images: int,
    class_steps: int,
    class_guidance: float,
    seed: int,
) -> nn.Module:
    """The ``dreambooth`` recipe (experiment=dreambooth): with prior preservation on, the
    base model tops ``class_dir`` up to ``class_images`` class images first."""
    if class_dir and class_prompt and prior_loss_weight > 0:
        ensure_class_images(
            module,
            class_dir,
            class_prompt,
            class_images,
            steps=class_steps,
            guidance_scale=class_guidance,
            seed=seed,
        )
    return module


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


def apply_textual_inversion(
    module: nn.Module, *, tokens: Sequence[str], init_words: Sequence[str]
) -> nn.Module:
    """The ``textual_inversion`` recipe: freeze every network weight (LoRA adapters, when a
    ``lora`` is on too, stay trainable) and add ``tokens`` (initialised from ``init_words``)
    to the conditioner: the new embedding rows train."""
    from ldm.models.textual_inversion import add_tokens

    conditioner = module.conditioner
    if conditioner is None or not hasattr(conditioner, "tokenize"):
        raise ValueError("textual inversion needs a text conditioner")
    for name, parameter in module.networks.named_parameters():
        if ".lora." not in name:
            parameter.requires_grad_(False)
    ids = add_tokens(conditioner, list(tokens), init_words=list(init_words))
    restart_ema(module)
    trainable = sum(p.numel() for p in module.networks.parameters() if p.requires_grad)
    log.info(
        "textual inversion: tokens %s (ids %s) from %s; %s trainable parameters",
        list(tokens),
        ids,
        list(init_words),
        trainable,
    )
    return module
