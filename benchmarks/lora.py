"""LoRA sizes on the SD-1.5-shaped UNet (construction only) and LoRA vs full fine-tuning
step time and peak memory for the small config on this CPU.

Sizes: adapter parameters and the safetensors file size (float32, as saved) at ranks 4,
8, 16 for the ``attn`` and ``attn+ff`` presets, counted on the meta device.
Speed: one process per mode (fresh peak RSS), median of ``--steps`` full AdamW steps of the
small UNet (+ text encoder) on batches of 16 cached 16 x 16 x 4 latents.

    .venv/bin/python benchmarks/lora.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sizes() -> list[dict]:
    """Adapter parameters and the exact safetensors file size (float32)."""
    import tempfile

    from safetensors.torch import save_file

    from ldm.models.unet import UNet
    from ldm.nn.lora import adapter_state_dict, inject_lora

    rows = []
    for targets in ("attn", "attn+ff"):
        for rank in (4, 8, 16):
            with torch.device("meta"):
                unet = UNet()  # SD 1.5; weights never materialised
                inject_lora(unet, "a", targets=targets, rank=rank)
            shapes = {k: v.shape for k, v in adapter_state_dict(unet, "a").items()}
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
                save_file({k: torch.zeros(s) for k, s in shapes.items()}, handle.name)
                size = Path(handle.name).stat().st_size
            params = sum(torch.Size(s).numel() for s in shapes.values())
            rows.append({"targets": targets, "rank": rank, "params": params, "bytes": size})
    return rows


def _rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_time(mode: str, steps: int) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from ldm.training.finetune import apply_lora

    overrides = [
        "model/backbone=unet_small",
        "model/conditioner=text_small",
        "model/vae=small",
        "data.dataset.size=64",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.task.pop("lr_scheduler")
        cfg.task.ema_decay = None
    vae = instantiate(cfg.model.vae)
    vae.scale_factor = 1.0
    module = instantiate(cfg.task, vae=vae)
    if mode == "lora":
        apply_lora(module, {"rank": 8, "targets": "attn"})
    params = [p for p in module.networks.parameters() if p.requires_grad]
    optimizer = module.make_optimizer(params)
    batch = {
        "moments": torch.randn(16, 8, 16, 16),
        "caption": ["a small red circle in the top left on a white background"] * 16,
        "key": [str(i) for i in range(16)],
    }
    before = _rss_peak_mib()

    def step():
        loss = module.loss(batch, module._generators(batch["key"], "bench"), module.networks, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    from train_throughput import median_step  # benchmarks/ is this script's folder

    median = median_step(step, steps, warmup=2)
    return {
        "mode": mode,
        "trainable": sum(p.numel() for p in params),
        "median_s": median,
        "peak_extra_mib": _rss_peak_mib() - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child process: one measurement, as JSON
        print(json.dumps(step_time(args.mode, args.steps)))
        return
    print("| preset | rank | adapter parameters | file size (MiB) |\n|---|---:|---:|---:|")
    for row in sizes():
        print(
            f"| {row['targets']} | {row['rank']} | {row['params']:,} | {row['bytes'] / 2**20:.2f} |"
        )
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU; small UNet, batch 16"
    )
    print("| mode | trainable parameters | step (s) | peak extra RSS (MiB) |\n|---|---:|---:|---:|")
    for mode in ("full", "lora"):
        done = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        cells = f"{row['trainable']:,} | {row['median_s']:.3f} | {row['peak_extra_mib']:.0f}"
        print(f"| {mode} | {cells} |")


if __name__ == "__main__":
    main()
