"""Training FLOPs per step of each denoiser backbone of the shapes recipe, counted by
``torch.utils.flop_counter`` (forward and backward of the whole loss: the denoiser and the
trainable text encoder; matmuls and convolutions, 2 FLOPs per multiply-add), with the
parameter count and the measured CPU time of a step (median of ``--steps``, batch in
memory, after warm-up). ``--budget-steps N --reference B`` also prints how many steps of
each backbone cost what N steps of B cost: the equal-compute comparison of docs/models.md.

    .venv/bin/python benchmarks/backbone_flops.py [--backbones unet_shapes dit_shapes ...]
        [--batch 64] [--budget-steps 2000 --reference unet_shapes] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from ldm.training.speed import count_flops

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(backbone: str, *overrides: str):
    """The shapes recipe's LatentDiffusion with ``backbone``, flow matching (no trainer)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=shapes_ldm",
                f"model/backbone={backbone}",
                "diffusion=flow",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.task.pop("lr_scheduler", None)  # its total_steps interpolates the trainer
    module = instantiate(cfg.task, vae=instantiate(cfg.model.vae))
    module.vae.scale_factor = 1.0  # latents come as random moments; the scale is irrelevant
    return module, cfg


def batch_of(cfg, size: int) -> dict:
    """``size`` shapes captions with random posterior moments, as a latent cache gives."""
    data = instantiate(cfg.data).dataset("train")
    captions = [data[i]["caption"] for i in range(size)]
    moments = torch.randn(size, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    return {"caption": captions, "moments": moments, "key": [str(i) for i in range(size)]}


def measure(backbone: str, batch_size: int, steps: int) -> dict:
    module, cfg = build(backbone)
    module.train()
    batch = batch_of(cfg, batch_size)
    networks = module.networks
    params = [p for p in networks.parameters() if p.requires_grad]

    def step() -> None:
        generators = module._generators(batch["key"], "bench")
        loss = module.loss(batch, generators, networks, module.hparams.cond_drop_prob)
        loss.backward()
        for p in params:
            p.grad = None

    flops = count_flops(step)
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    denoiser = sum(p.numel() for p in networks["denoiser"].parameters())
    return {
        "backbone": backbone,
        "parameters": denoiser,
        "flops_per_step": flops,
        "seconds_per_step": statistics.median(times),
        "batch_size": batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones", nargs="+", default=["unet_shapes", "dit_shapes", "mmdit_shapes"]
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget-steps", type=int, default=None)
    parser.add_argument("--reference", default="unet_shapes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(b, args.batch, args.steps) for b in args.backbones]
    if args.budget_steps:
        reference = next(r for r in rows if r["backbone"] == args.reference)
        budget = args.budget_steps * reference["flops_per_step"]
        for row in rows:
            row["budget_flops"] = budget
            row["equal_compute_steps"] = round(budget / row["flops_per_step"])
    print("| backbone | parameters | GFLOPs / step | s / step (CPU) | steps at equal FLOPs |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['parameters']:,} | {r['flops_per_step'] / 1e9:.1f} | "
            f"{r['seconds_per_step']:.3f} | {r.get('equal_compute_steps', '')} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
