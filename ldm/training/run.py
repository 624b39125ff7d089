"""The body of ``train.py``: build everything from a composed config, then fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.training.callbacks import AtomicCheckpointIO
from ldm.training.checkpoints import load_vae, resolve_resume


def build(
    cfg: DictConfig, run_dir: str | Path
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The module, the data and the trainer a training config describes (seeded first, so
    the same config always builds the same initial weights)."""
    L.seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    parts = {}
    if cfg.task_name == "ldm":  # the frozen VAE: a trained one, else the preset untrained
        parts["vae"] = (
            load_vae(cfg.vae_checkpoint) if cfg.vae_checkpoint else instantiate(cfg.model.vae)
        )
    module = instantiate(cfg.task, **parts)
    module.run_config = OmegaConf.to_yaml(cfg, resolve=True)  # saved in every checkpoint
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    return module, data, trainer


def train(cfg: DictConfig, run_dir: str | Path) -> L.Trainer:
    """Build, resume (``cfg.resume``) and fit; returns the trainer."""
    module, data, trainer = build(cfg, run_dir)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer
