"""Forward + backward time and peak memory: our UNet vs diffusers' UNet2DConditionModel.

Same configuration, same weights, same inputs. Time: both models in one process, their
steps interleaved, so machine noise hits both alike (median of ``--steps``). Memory: each
(implementation, size) in a fresh process, so its peak resident memory (VmHWM, minus
what the process held before the first step) is its own; the activation memory autograd
keeps for backward is counted exactly with saved-tensor hooks. Run by hand; diffusers is a
test / benchmark oracle only.

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


def _models(size: str, only: str | None = None) -> dict:
    """Fresh copies of our UNet and diffusers' (or just ``only``) with the same weights,
    each with its step function. The seeded source model is freed before returning, so a
    single copy starts from the same allocator state whichever it is."""
    from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_to_diffusers
    from ldm.models.unet import UNet

    torch.manual_seed(0)
    source = UNet(**_config(size))
    batch, side = INPUTS[size]
    x = torch.randn(batch, 4, side, side)
    t = torch.rand(batch) * 999
    context = torch.randn(batch, 16, source.context_dim)
    models = {}
    if only in (None, "ldm"):
        ours = UNet(**source.config)
        ours.load_state_dict(source.state_dict())
        models["ldm"] = (ours, lambda: ours(x, t, context).square().mean().backward())
    if only in (None, "diffusers"):
        import diffusers

        theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(source.config))
        theirs.load_state_dict(unet_to_diffusers(source.state_dict(), source.config))
        models["diffusers"] = (
            theirs,
            lambda: theirs(x, t, encoder_hidden_states=context).sample.square().mean().backward(),
        )
    del source
    return models


def _peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM belongs to the process image; ru_maxrss
    on Linux keeps the high-water mark of a large parent across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory(impl: str, size: str, steps: int) -> dict:
    ((model, step),) = _models(size, only=impl).values()
    saved: dict[int, int] = {}  # storage -> bytes kept for backward, counted once each

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    before = _peak_rss_kib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step()
    peak = _peak_rss_kib() - before
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "peak_mib": peak / 1024,
        "saved_mib": sum(saved.values()) / 2**20,
    }


def _times(size: str, steps: int) -> dict[str, float]:
    models = _models(size)
    times: dict[str, list[float]] = {impl: [] for impl in models}
    for i in range(steps + 3):  # three warm-up rounds
        for impl, (model, step) in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if i >= 3:
                times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(values) for impl, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SIZE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_memory(*args.worker, min(args.steps, 5))))
        return
    rows = []
    for size in args.sizes:
        median = _times(size, args.steps)
        for impl in ("ldm", "diffusers"):
            cmd = [sys.executable, __file__, "--worker", impl, size, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"impl": impl, "size": size, "median_s": median[impl], **row})
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
