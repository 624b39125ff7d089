"""Forward + backward time and peak memory: our UNet vs diffusers' UNet2DConditionModel.

Same configuration, same weights, same inputs. Each (implementation, size) runs in a fresh
process so its peak resident memory (ru_maxrss, minus what the process held before the
first step) is its own; the activation memory autograd keeps for backward is also counted
exactly, with saved-tensor hooks. Run by hand; diffusers is a test / benchmark oracle only.

    .venv/bin/python benchmarks/unet_vs_diffusers.py [--sizes tiny small] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"tiny": (8, 8), "small": (8, 16)}  # batch, latent side


def _config(size: str) -> dict:
    path = ROOT / "conf" / "model" / "unet" / f"{size}.yaml"
    data = yaml.safe_load(path.read_text())
    base = {}
    for entry in data.pop("defaults", []):
        if entry != "_self_":
            base.update(_config(entry))
    base.update(data)
    base.pop("_target_", None)
    return base


def _worker(impl: str, size: str, steps: int) -> dict:
    torch.manual_seed(0)
    from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_to_diffusers
    from ldm.models.unet import UNet

    ours = UNet(**_config(size))
    batch, side = INPUTS[size]
    x = torch.randn(batch, 4, side, side)
    t = torch.rand(batch) * 999
    context = torch.randn(batch, 16, ours.context_dim)
    # Both sides build a second model from the first one's weights and free the first, so
    # the allocator starts from the same state.
    if impl == "diffusers":
        import diffusers

        model = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(ours.config))
        model.load_state_dict(unet_to_diffusers(ours.state_dict(), ours.config))

        def step():
            model(x, t, encoder_hidden_states=context).sample.square().mean().backward()
    else:
        model = UNet(**ours.config)
        model.load_state_dict(ours.state_dict())

        def step():
            model(x, t, context).square().mean().backward()

    del ours

    saved: dict[int, int] = {}  # storage -> bytes kept for backward, counted once each

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    times = []
    for i in range(steps + 2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "impl": impl,
        "size": size,
        "params": sum(p.numel() for p in model.parameters()),
        "median_s": statistics.median(times),
        "peak_mib": peak / 1024,
        "saved_mib": sum(saved.values()) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SIZE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.steps)))
        return
    rows = []
    for size in args.sizes:
        for impl in ("ldm", "diffusers"):
            cmd = [sys.executable, __file__, "--worker", impl, size, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        "| size | impl | parameters | fwd+bwd median (s) | peak extra RSS (MiB) "
        "| saved for backward (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']} | {r['impl']} | {r['params']:,} | {r['median_s']:.4f} | "
            f"{r['peak_mib']:.1f} | {r['saved_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
