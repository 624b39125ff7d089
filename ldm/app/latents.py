"""``python -m ldm.data.latents VAE OUT``: encode a data config's splits into latent caches."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm import CONF_DIR
from ldm.app import reported
from ldm.data.latents import cache_latents
from ldm.training.checkpoints import load_vae


@reported
def main(argv: list[str] | None = None) -> int:
    """``python -m ldm.data.latents VAE OUT [--data shapes] [--splits train val] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m ldm.data.latents",
        description="Encode a data config's splits with a frozen VAE into latent caches "
        "OUT/<split>/ (read them back with data=latents data.dataset.root=OUT).",
    )
    parser.add_argument("vae", help="the VAE: our .ckpt, an SD single file or a diffusers folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", default="shapes", help="a conf/data/ option (default shapes)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("overrides", nargs="*", help="data config overrides, e.g. dataset.size=64")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name=None,
            overrides=[f"+data={args.data}"] + [f"data.{o}" for o in args.overrides],
        )
    data = instantiate(cfg.data)
    vae = load_vae(args.vae)
    for split in args.splits:
        info = cache_latents(
            data.dataset(split),
            vae,
            args.out / split,
            batch_size=args.batch_size,
            dtype=getattr(torch, args.dtype),
            vae_source=str(Path(args.vae).resolve()),
        )
        print(
            f"{split}: {info['count']} latents in {info['shards']} shard(s) -> {args.out / split} "
            f"(latent std {info['latent_std']:.4f})"
        )
    return 0
