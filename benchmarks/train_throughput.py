"""Training throughput (images / s) of the tiny and small configs, measured in-process.

For each size: the autoencoder stage (``task=vae``, no discriminator, as the shapes
experiment) and the diffusion stage encoding images live (``data=shapes``) or reading a
latent cache (random moments of the right shape: the same work as ``data=latents``).
Each timing is the median of ``--steps`` full optimizer steps (forward, backward, clip,
AdamW, EMA) after warm-up, with the batch already in memory. Run by hand:

    .venv/bin/python benchmarks/train_throughput.py [--sizes tiny small] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZES = {  # preset names, batch size, image side
    "tiny": dict(unet="unet_tiny", vae="tiny", conditioner="text_tiny", batch=64, side=32),
    "small": dict(unet="unet_small", vae="small", conditioner="text_small", batch=32, side=64),
}


def _config(size: str, task: str):
    s = SIZES[size]
    overrides = [
        f"task={task}",
        f"model/backbone={s['unet']}",
        f"model/vae={s['vae']}",
        f"model/conditioner={s['conditioner']}",
        f"data.dataset.size={s['side']}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.task.pop("lr_scheduler", None)  # its total_steps interpolates the trainer
    return cfg


def _batch(cfg, size: str, latents: bool, vae) -> dict:
    s = SIZES[size]
    data = instantiate(cfg.data).dataset("train")
    items = [data[i] for i in range(s["batch"])]
    batch = {k: [item[k] for item in items] for k in items[0]}
    batch["image"] = torch.stack(batch["image"])
    if latents:
        with torch.no_grad():
            posterior = vae.encode(batch["image"])
        batch["moments"] = torch.cat([posterior.mean, posterior.logvar], 1)
        del batch["image"]
    return batch


def median_step(step, steps: int, warmup: int = 3) -> float:
    """Median seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ldm(size: str, latents: bool, steps: int) -> float:
    cfg = _config(size, "ldm")
    vae = instantiate(cfg.model.vae)
    vae.scale_factor = 1.0
    module = instantiate(cfg.task, vae=vae)
    optimizer = module.make_optimizer([p for p in module.networks.parameters() if p.requires_grad])
    batch = _batch(cfg, size, latents, vae)

    def step():
        loss = module.loss(batch, module._generators(batch["key"], "bench"), module.networks, 0.1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.networks.parameters(), 1.0)
        optimizer.step()
        module.ema.update(module._trainable())

    return SIZES[size]["batch"] / median_step(step, steps)


def autoencoder(size: str, steps: int) -> float:
    cfg = _config(size, "vae")
    with open_dict(cfg):
        cfg.task.discriminator = None
    module = instantiate(cfg.task)
    optimizer = module.make_optimizer([*module.vae.parameters(), module.logvar])
    batch = _batch(cfg, size, False, None)
    generator = torch.Generator().manual_seed(0)

    def step():
        terms, _ = module.losses(batch, generator, adversarial=False)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()

    return SIZES[size]["batch"] / median_step(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("| size | batch | image | VAE (img/s) | LDM, live VAE (img/s) | LDM, cache (img/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        s = SIZES[size]
        rates = [
            autoencoder(size, args.steps),
            ldm(size, False, args.steps),
            ldm(size, True, args.steps),
        ]
        cells = " | ".join(f"{r:.0f}" for r in rates)
        print(f"| {size} | {s['batch']} | {s['side']} px | {cells} |", flush=True)


if __name__ == "__main__":
    main()
