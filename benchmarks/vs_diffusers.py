"""Training-step time and peak memory: our UNet and VAE against diffusers'
``UNet2DConditionModel`` / ``AutoencoderKL``, with each speed lever on its own.

A step is what training does: zero the gradients, forward, loss, backward, AdamW step.
Same configuration, same weights, same inputs and noise for every variant. diffusers runs
as its users run it: defaults, eager, ``torch.optim.AdamW()`` with its default
implementation. Our variants add one lever at a time (fused AdamW, channels-last weights,
``torch.compile``) and end with ``ours`` — what ``train.py`` uses by default for that
network (``conf/task``: fused AdamW and channels-last weights).

Time: all variants of one model in one process, their steps interleaved, so machine noise
hits all alike (median of ``--steps``). Memory: each variant in a fresh process, so its
peak resident memory (VmHWM minus what the process held before the first step) is its own;
and the peak of live tensor memory over two steps of a fresh copy, from the profiler's
allocation events (what the step needs, without the allocator's caching and fragmentation).
Op-level levers (a fused GroupNorm + SiLU in eager PyTorch, the CPU SDPA kernels) are timed
on their own with ``--ops``. Run by hand; diffusers is a test / benchmark oracle only.

    .venv/bin/python benchmarks/vs_diffusers.py [--models unet-tiny vae-tiny] [--steps 30]
        [--compile] [--ops]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
# model -> (network, preset, batch, side of the input: latents for the UNet, pixels for the VAE)
MODELS = {
    "unet-tiny": ("unet", "unet_tiny", 8, 8),
    "unet-small": ("unet", "unet_small", 8, 16),
    "vae-tiny": ("vae", "tiny", 8, 32),
    "vae-small": ("vae", "small", 8, 64),
}
# variant -> (implementation, AdamW options, channels_last, compiled)
VARIANTS = {
    "diffusers": ("diffusers", {}, False, False),
    "ours, as diffusers": ("ldm", {}, False, False),
    "+ fused AdamW": ("ldm", {"fused": True}, False, False),
    "+ channels_last": ("ldm", {"fused": True}, True, False),
    "+ compile": ("ldm", {"fused": True}, None, True),  # None: the format `ours` uses
}
CHANNELS_LAST = {"unet": True, "vae": True}  # what train.py uses (conf/task/*.yaml)


def _preset(network: str, preset: str) -> dict:
    path = ROOT / "conf" / "model" / network / f"{preset}.yaml"
    data = yaml.safe_load(path.read_text())
    base = {}
    for entry in data.pop("defaults", []):
        if entry != "_self_":
            base.update(_preset(network, entry))
    base.update(data)
    base.pop("_target_", None)
    return base


def _variants(compiled: bool) -> dict:
    variants = {k: v for k, v in VARIANTS.items() if compiled or not v[3]}
    return variants | {"ours": ("ldm", {"fused": True}, None, False)}


def _build(model: str, variant: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A fresh network of ``variant`` with the shared seeded weights, and its step."""
    network, preset, batch, side = MODELS[model]
    impl, adamw, channels_last, compiled = _variants(True)[variant]
    if channels_last is None:
        channels_last = CHANNELS_LAST[network]
    torch.manual_seed(0)
    if network == "unet":
        from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_to_diffusers
        from ldm.models.unet import UNet

        source = UNet(**_preset("backbone", preset))
        x = torch.randn(batch, 4, side, side)
        t = torch.rand(batch) * 999
        context = torch.randn(batch, 16, source.context_dim)
        if impl == "diffusers":
            import diffusers

            net = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(source.config))
            net.load_state_dict(unet_to_diffusers(source.state_dict(), source.config))

            def loss() -> torch.Tensor:
                return net(x, t, encoder_hidden_states=context).sample.square().mean()

        else:
            net = UNet(**source.config)
            net.load_state_dict(source.state_dict())
            forward = net

            def loss() -> torch.Tensor:
                return forward(x, t, context).square().mean()

    else:
        from ldm.convert.diffusers_vae import vae_config_to_diffusers, vae_to_diffusers
        from ldm.models.vae import AutoencoderKL

        source = AutoencoderKL(**_preset("vae", preset))
        x = torch.rand(batch, 3, side, side) * 2 - 1
        generator = torch.Generator()
        if impl == "diffusers":
            import diffusers

            net = diffusers.AutoencoderKL(**vae_config_to_diffusers(source.config))
            net.load_state_dict(vae_to_diffusers(source.state_dict()))

            def loss() -> torch.Tensor:
                posterior = net.encode(x).latent_dist
                recon = net.decode(posterior.sample(generator.manual_seed(0))).sample
                return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()

        else:
            net = AutoencoderKL(**source.config)
            net.load_state_dict(source.state_dict())

            def loss() -> torch.Tensor:
                posterior = net.encode(x)
                recon = net.decode(posterior.sample(generator.manual_seed(0)))
                return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()

    del source
    if impl == "ldm":
        from ldm.training.speed import compile_network, to_channels_last

        if channels_last:
            to_channels_last(net)
        if compiled:
            if network == "unet":
                compile_network(net, True)
            else:
                compile_network(net.encoder, True)
                compile_network(net.decoder, True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, **adamw)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return net, step


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


def _peak_tensor_bytes(step: Callable[[], None], steps: int) -> int:
    """The most tensor memory alive at once over ``steps`` steps, above what was alive
    before the first: gradients, optimizer states and activations, counted by the
    profiler's allocation events, so the allocator's caching and fragmentation (which RSS
    includes) do not enter."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _memory(model: str, variant: str, steps: int) -> dict:
    net, step = _build(model, variant)
    before = _peak_rss_kib()
    for _ in range(steps):
        step()
    peak_rss = (_peak_rss_kib() - before) / 1024
    del net, step
    net, step = _build(model, variant)  # afresh: its first step allocates the states
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "peak_mib": peak_rss,
        "tensor_mib": _peak_tensor_bytes(step, 2) / 2**20,
    }


def _times(model: str, steps: int, compiled: bool) -> dict[str, float]:
    runs = {variant: _build(model, variant)[1] for variant in _variants(compiled)}
    if compiled:
        start = time.perf_counter()
        runs["+ compile"]()  # compiles
        print(f"{model}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    times: dict[str, list[float]] = {variant: [] for variant in runs}
    for i in range(steps + 3):  # three warm-up rounds
        for variant, step in runs.items():
            start = time.perf_counter()
            step()
            if i >= 3:
                times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(values) for variant, values in times.items()}


# --------------------------------------------------------------------------- op levers


class _GroupNormSiLU(torch.autograd.Function):
    """GroupNorm then SiLU as one autograd node that saves only the input and recomputes
    the normalised values in backward (the memory-saving fusion, in eager PyTorch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups = groups
        return F.silu(y, inplace=True)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, groups = x.shape[0], x.shape[1], ctx.groups
        shape = (1, c) + (1,) * (x.ndim - 2)
        normed = (x.reshape(n, groups, -1) - mean[..., None]) * rstd[..., None]
        y = normed.reshape(x.shape) * weight.view(shape) + bias.view(shape)
        s = torch.sigmoid(y)
        grad_y = grad * s * (1 + y * (1 - s))
        grads = torch.ops.aten.native_group_norm_backward(
            grad_y, x, mean, rstd, weight, n, c, x[0, 0].numel(), groups, [True, True, True]
        )
        return *grads, None, None


def _median_ms(fn: Callable[[], object], steps: int = 30) -> float:
    from train_throughput import median_step  # benchmarks/ is this script's folder

    return median_step(fn, steps) * 1000


def _gn_silu_ms(shape: tuple[int, ...], groups: int, channels_last: bool) -> tuple[float, float]:
    """GroupNorm + SiLU forward + backward: two native kernels, and one custom node."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.randn(shape[1], requires_grad=True), torch.randn(shape[1], requires_grad=True)
    grad = torch.randn(shape)

    def native() -> None:
        torch.autograd.grad(F.silu(F.group_norm(x, groups, w, b, 1e-5)), (x, w, b), grad)

    def fused() -> None:
        torch.autograd.grad(_GroupNormSiLU.apply(x, w, b, groups, 1e-5), (x, w, b), grad)

    return _median_ms(native), _median_ms(fused)


def _sdpa_ms(tokens: int, keys: int, heads: int, dim: int) -> tuple[float, float]:
    """Attention forward + backward with the math kernel, and with the flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, heads, tokens, dim, requires_grad=True)
    k = torch.randn(8, heads, keys, dim, requires_grad=True)
    v = torch.randn(8, heads, keys, dim, requires_grad=True)

    def run(backend: SDPBackend) -> float:
        def once() -> None:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
            out.sum().backward()

        return _median_ms(once)

    return run(SDPBackend.MATH), run(SDPBackend.FLASH_ATTENTION)


def ops() -> None:
    """GroupNorm + SiLU (two native kernels vs one custom autograd node) and SDPA kernels,
    forward + backward, on the shapes the tiny / small presets see."""
    print("| op | shape | layout | native / math (ms) | lever (ms) |")
    print("|---|---|---|---:|---:|")
    for shape, groups in (((8, 32, 8, 8), 16), ((8, 128, 16, 16), 32), ((8, 16, 32, 32), 8)):
        for channels_last in (False, True):
            native, fused = _gn_silu_ms(shape, groups, channels_last)
            layout = "channels_last" if channels_last else "NCHW"
            print(
                f"| GroupNorm + SiLU, one node | {shape} | {layout} | {native:.3f} | {fused:.3f} |"
            )
    for tokens, heads, dim in ((16, 2, 32), (64, 4, 32), (256, 2, 32)):
        for keys, what in ((tokens, "self"), (16, "cross")):
            math, flash = _sdpa_ms(tokens, keys, heads, dim)
            shape = f"(8, {heads}, {tokens}, {dim}) x {keys} keys"
            print(
                f"| SDPA {what}-attention, flash kernel | {shape} | - | {math:.3f} | {flash:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (minutes)")
    parser.add_argument("--ops", action="store_true", help="only the op-level levers")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_memory(*args.worker, min(args.steps, 5))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if args.ops:
        ops()
        return
    print(
        "| model | variant | parameters | step median (ms) | vs diffusers | peak extra RSS (MiB) "
        "| vs diffusers | peak tensors (MiB) | vs diffusers |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        median = _times(model, args.steps, args.compile)
        memory = {}
        for variant in median:
            if args.no_memory or variant == "+ compile":
                continue
            cmd = [sys.executable, __file__, "--worker", model, variant, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        base_time, base = median["diffusers"], memory.get("diffusers", {})
        for variant, seconds in median.items():
            row = memory.get(variant, {})
            params = f"{row['params']:,}" if row else ""
            cells = []
            for key in ("peak_mib", "tensor_mib"):
                cells.append(f"{row[key]:.1f}" if row else "")
                cells.append(f"{row[key] / base[key]:.2f}" if row and base.get(key) else "")
            print(
                f"| {model} | {variant} | {params} | {seconds * 1000:.1f} | "
                f"{seconds / base_time:.2f} | " + " | ".join(cells) + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
