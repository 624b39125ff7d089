"""The body of ``train.py``: build everything from a composed config, then fit."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.app import CONFIG_PATH, reported
from ldm.data.latents import fingerprint, read_cache_info
from ldm.training.callbacks import AtomicCheckpointIO, SavedConfig
from ldm.training.checkpoints import load_vae, resolve_resume
from ldm.training.finetune import load_base

log = logging.getLogger(__name__)
# The fine-tuning recipes, in the order they apply: class images come from the base model
# before adapters change it; textual inversion keeps LoRA adapters trainable.
RECIPES = ("dreambooth", "lora", "textual_inversion")


def build(
    cfg: DictConfig, run_dir: str | Path
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The module, the data and the trainer a training config describes (seeded first, so
    the same config always builds the same initial weights)."""
    L.seed_everything(cfg.seed, workers=True)
    saved = OmegaConf.to_yaml(cfg, resolve=True)  # a missing value stops here, named
    data = instantiate(cfg.data)
    parts = {}
    if cfg.task_name == "ldm":
        parts["vae"] = frozen_vae(cfg)
    module = instantiate(cfg.task, **parts)
    if cfg.get("base"):  # fine-tuning: start from trained weights
        loaded = load_base(module, cfg.base, cfg.diffusion)
        log.info("base weights for %s from %s", loaded, cfg.base)
    for name in RECIPES:  # each a (module, **settings) -> module named by its config
        if cfg.get(name):
            module = instantiate(cfg[name])(module)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks.append(SavedConfig(saved))  # the config inside every checkpoint
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    return module, data, trainer


def frozen_vae(cfg: DictConfig) -> nn.Module:
    """The diffusion stage's VAE: ``vae_checkpoint``; else, training from a latent cache,
    the VAE that made the cache (recorded in it); else the ``model/vae`` preset untrained,
    with a warning (only tests want that)."""
    path = cfg.vae_checkpoint or cfg.get("base")  # a base model brings its VAE
    cache = _latent_cache_info(cfg)
    if path is None and cache is not None:
        path = cache.get("vae_source")
        if path is None:
            raise ValueError(
                "this latent cache does not say which VAE made it: give vae_checkpoint="
            )
        log.info("vae_checkpoint: %s (the VAE that made the latent cache)", path)
    if path is None:
        log.warning(
            "training latent diffusion on an UNTRAINED VAE (the model/vae preset): give "
            "vae_checkpoint=<a trained VAE> for anything but tests"
        )
        return instantiate(cfg.model.vae)
    vae = load_vae(path)
    if cache is not None and cache.get("vae_fingerprint") not in (None, fingerprint(vae)):
        raise ValueError(
            f"vae_checkpoint {path} is not the VAE that made the latent cache (its weights "
            "differ): its latents would decode to nonsense. Use that VAE or re-cache."
        )
    return vae


def _latent_cache_info(cfg: DictConfig) -> dict | None:
    dataset = cfg.data.get("dataset", {})
    if not str(dataset.get("_target_", "")).endswith("latent_cache"):
        return None
    return read_cache_info(Path(dataset.root) / "train")


def train(cfg: DictConfig, run_dir: str | Path) -> L.Trainer:
    """Build, resume (``cfg.resume``) and fit; returns the trainer."""
    module, data, trainer = build(cfg, run_dir)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@reported()  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    """``python -m ldm.train``: train the autoencoder or the diffusion model (conf/train.yaml)."""
    train(cfg, HydraConfig.get().runtime.output_dir)
