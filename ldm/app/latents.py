"""``python -m ldm.data.latents vae=VAE out=OUT``: encode a data config's splits into latent
caches (conf/latents.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm.app import CONFIG_PATH, reported
from ldm.data.latents import cache_latents
from ldm.training.checkpoints import load_vae

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="latents")
@reported(ValueError)
def main(cfg: DictConfig) -> None:
    """Encode ``cfg.splits`` of ``cfg.data`` with the VAE ``cfg.vae`` into ``cfg.out``."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype} is not one of {', '.join(DTYPES)}")
    data = instantiate(cfg.data)
    vae = load_vae(cfg.vae)
    out = Path(cfg.out)
    for split in cfg.splits:
        info = cache_latents(
            data.dataset(split),
            vae,
            out / split,
            batch_size=cfg.batch_size,
            dtype=DTYPES[cfg.dtype],
            vae_source=str(Path(cfg.vae).resolve()),
        )
        print(
            f"{split}: {info['count']} latents in {info['shards']} shard(s) -> {out / split} "
            f"(latent std {info['latent_std']:.4f})"
        )
