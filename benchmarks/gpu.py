"""SD-scale training and sampling speed on a GPU, against diffusers: FLOPs, MFU, samples/s
and peak memory of each speed lever (issue 18; docs/performance.md).

``flops``: FLOPs per sample of a training step (forward + backward of the UNet) and of
one sampling step (the UNet on the fused classifier-free-guidance batch) and of a whole
prompt-to-image sample (text encoder, every step, VAE decode), by
``torch.utils.flop_counter``. ``train``: a training step on 64 x 64 latents (zero grad,
noise, bf16 autocast forward, loss, backward, AdamW, EMA) for diffusers'
``UNet2DConditionModel`` as its training script runs it (``torch.optim.AdamW()``,
``EMAModel``) and for ours with one lever at a time; then ours at other batch sizes.
``sample``: prompt to image (on the host, as a tensor) at 512 px, DDIM 50 steps with
guidance 7.5, batch 1, for diffusers' ``StableDiffusionPipeline`` and ours (``Pipeline``),
same weights, in fp32 / bf16 and with each lever. Every variant runs after warm-up (compile
included); times are medians; memory is ``max_memory_allocated``; MFU is against the
device's published dense bf16 peak (``ldm.training.speed.PEAK_BF16_TFLOPS``, or
``--peak-tflops``). Weights are random: speed does not depend on them.

    python benchmarks/gpu.py [--parts flops train sample] [--batch 32] [--sweep 8 16 64]
        [--train-variants ...] [--sample-variants ...] [--json out.json]
    python benchmarks/gpu.py --tiny --device cpu   # the same code on tiny networks (a check)
    python benchmarks/gpu.py --parts flops --device meta   # FLOPs alone, without computing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from train_throughput import median_step  # benchmarks/ is this script's folder
from vs_diffusers import _preset

from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.models.openclip import OpenCLIPTextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import Pipeline
from ldm.training.ema import EMA
from ldm.training.speed import compile_network, count_flops, mfu, peak_tflops, to_channels_last

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
TINY_TEXT = {  # an open_clip text tower of CLIP's layout, 64 wide
    "embed_dim": 32,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    "quick_gelu": True,
}
TINY_UNET = dict(model_channels=32, channel_multipliers=[1, 2], blocks_per_level=1,
                 attention_levels=[0, 1], num_heads=4, context_dim=64, norm_groups=8)  # fmt: skip

TRAIN_VARIANTS = {  # name -> (implementation, options)
    "diffusers": ("diffusers", {}),
    "ours": ("ours", {}),
    "ours + channels_last": ("ours", {"channels_last": True}),
    "ours, SDPA flash": ("ours", {"sdpa": "FLASH_ATTENTION"}),
    "ours, SDPA efficient": ("ours", {"sdpa": "EFFICIENT_ATTENTION"}),
    "ours, SDPA cuDNN": ("ours", {"sdpa": "CUDNN_ATTENTION"}),
    "ours, EMA off": ("ours", {"ema": False}),
    "ours, training module": ("module", {}),
    "ours, gradient checkpointing": ("ours", {"checkpointing": True}),
    "ours + compile": ("ours", {"compile": True}),
    "ours + compile + channels_last": ("ours", {"compile": True, "channels_last": True}),
    "ours + compile max-autotune": ("ours", {"compile": "max-autotune-no-cudagraphs"}),
    "diffusers + compile": ("diffusers", {"compile": True}),
}
SAMPLE_VARIANTS = {  # name -> (implementation, options)
    "diffusers fp32": ("diffusers", {"dtype": "fp32"}),
    "diffusers bf16": ("diffusers", {"dtype": "bf16"}),
    "ours fp32": ("ours", {"dtype": "fp32"}),
    "ours bf16": ("ours", {"dtype": "bf16"}),
    "ours bf16 + channels_last": ("ours", {"dtype": "bf16", "channels_last": True}),
    "ours bf16 + compile": ("ours", {"dtype": "bf16", "compile": True}),
    "ours bf16 + compile, CUDA graphs": ("ours", {"dtype": "bf16", "compile": "reduce-overhead"}),
    "ours bf16 + compile max-autotune": ("ours", {"dtype": "bf16", "compile": "max-autotune"}),
    "diffusers bf16 + compile": ("diffusers", {"dtype": "bf16", "compile": True}),
}
# What runs without naming variants: each lever once; max-autotune (long compiles) and a
# compiled diffusers on request.
DEFAULT_TRAIN = [v for v in TRAIN_VARIANTS if "max-autotune" not in v and "diffusers +" not in v]
DEFAULT_SAMPLE = [
    "diffusers fp32",
    "diffusers bf16",
    "ours fp32",
    "ours bf16",
    "ours bf16 + channels_last",
    "ours bf16 + compile, CUDA graphs",
]


# --------------------------------------------------------------------------- networks


class Networks:
    """One set of random weights: our UNet, VAE and CLIP text tower (SD 1.5's shapes, or
    tiny ones), kept on the host; each variant gets fresh copies on the device."""

    def __init__(self, tiny: bool):
        torch.manual_seed(0)
        self.tiny = tiny
        unet = UNet(**(TINY_UNET if tiny else _preset("backbone", "sd15")))
        self.unet, self.unet_config = unet.state_dict(), unet.config  # every argument
        vae = AutoencoderKL(**_preset("vae", "tiny" if tiny else "sd"))
        self.vae_config = vae.config
        text = {"model_config": TINY_TEXT} if tiny else {}
        self.text_options = dict(layer="last", pad_with_eot=True, **text)
        vae.scale_factor = 0.18215
        self.vae = vae.state_dict()
        self.hf_text = self._hf_text_model()
        self.image_size = 32 if tiny else 512
        self.latent_size = 8 if tiny else 64

    def _hf_text_model(self):
        import transformers

        cfg = TINY_TEXT["text_cfg"] if self.tiny else {"width": 768, "heads": 12, "layers": 12}
        config = transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg["width"],
            intermediate_size=4 * cfg["width"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        return transformers.CLIPTextModel(config).eval()

    def ours_unet(self, device) -> UNet:
        with torch.device(device):
            unet = UNet(**self.unet_config)
        unet.load_state_dict(self.unet)
        return unet

    def diffusers_unet(self, device):
        import diffusers

        from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_to_diffusers

        config = unet_config_to_diffusers(self.unet_config)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**config)
        unet.load_state_dict(unet_to_diffusers(self.unet, self.unet_config))
        return unet

    def ours_pipeline(self, device) -> Pipeline:
        with torch.device(device):
            vae = AutoencoderKL(**self.vae_config)
            text = OpenCLIPTextEncoder("ViT-L-14-quickgelu", **self.text_options)
        vae.load_state_dict(self.vae)
        vae.scale_factor = 0.18215
        text.load_text_state(self.hf_text.state_dict())
        size = (self.image_size, self.image_size)
        schedule = make_schedule("scaled_linear")
        return Pipeline(self.ours_unet(device), text, vae, schedule, "eps", size).eval()

    def diffusers_pipeline(self, device, folder: Path):
        import diffusers
        import transformers

        from ldm.convert.diffusers_vae import vae_config_to_diffusers, vae_to_diffusers

        with torch.device(device):
            vae = diffusers.AutoencoderKL(**vae_config_to_diffusers(self.vae_config))
        vae.load_state_dict(vae_to_diffusers(self.vae))
        scheduler = diffusers.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="trailing",  # as ours: make_sampler("ddim") is trailing
        )
        return diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=copy.deepcopy(self.hf_text).to(device),
            tokenizer=transformers.CLIPTokenizer(
                *clip_tokenizer_files(folder), model_max_length=77
            ),
            unet=self.diffusers_unet(device),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def clip_tokenizer_files(folder: Path) -> tuple[str, str]:
    """``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer, written from the
    vocabulary open_clip ships (what SD 1.5's tokenizer folder holds)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():  # written for an earlier variant
        return str(vocab_file), str(merges_file)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # open_clip's merges
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return str(vocab_file), str(merges_file)


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device, warmup: int, steps: int) -> float:
    """Median seconds of ``fn`` (the device synchronised after each call) after warm-up."""

    def synced() -> None:
        fn()
        _sync(device)

    return median_step(synced, steps, warmup)


def _reset_memory(device) -> None:
    torch._dynamo.reset()  # each variant compiles its own network afresh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _autocast(device):
    if device.type == "meta":  # counting FLOPs only: the dtype does not change them
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sdpa(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


# --------------------------------------------------------------------------- training


def _module_step(nets: Networks, x0, context, device):
    """The framework's own step: ``LatentDiffusion.loss`` on a latent cache's batch (VAE
    moments and text tokens; per-sample noise generators, caption dropout), fused AdamW and
    its EMA, as train.py runs it."""
    from ldm.training.diffusion import LatentDiffusion

    parts = nets.ours_pipeline(device)
    module = LatentDiffusion(parts.denoiser.train(), parts.conditioner, parts.vae,
                             schedule=parts.schedule).to(device)  # fmt: skip
    moments = torch.cat([x0 / parts.vae.scale_factor, torch.full_like(x0, -20.0)], 1)
    batch = {"moments": moments, "context": context, "key": [str(i) for i in range(len(x0))]}
    trainable = module._trainable()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        generators = module._generators(batch["key"], "train", module.ema.count())
        with _autocast(device):
            loss = module.loss(batch, generators, module.networks, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(trainable)

    return module, step


def _train_step(nets: Networks, impl: str, options: dict, batch: int, device):
    """A fresh network of ``impl`` with ``options`` and its training step (a closure)."""
    size, width = nets.latent_size, nets.unet_config["context_dim"]
    g = None if device.type == "meta" else torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, 4, size, size, device=device, generator=g)
    context = torch.randn(batch, 77, width, device=device, generator=g)
    if impl == "module":
        return _module_step(nets, x0, context, device)
    alphas = make_schedule("scaled_linear").alphas_cumprod.to(device, torch.float32)
    net = (nets.diffusers_unet if impl == "diffusers" else nets.ours_unet)(device).train()
    if options.get("channels_last"):
        to_channels_last(net)
    if options.get("checkpointing"):
        net.gradient_checkpointing = True
    use_ema = options.get("ema", True)
    if impl == "diffusers":  # as diffusers' train_text_to_image.py runs it, --use_ema
        from diffusers.training_utils import EMAModel

        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)  # the script's default
        ema = EMAModel(net.parameters(), decay=0.9999) if use_ema else None

        def forward(x, t):
            return net(x, t, encoder_hidden_states=context).sample

        def average():
            ema.step(net.parameters())

    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
        ema = EMA(net, decay=0.9999) if use_ema else None

        def forward(x, t):
            return net(x, t, context)

        def average():
            ema.update(net)

    compile_network(net, options.get("compile"))  # after the EMA copy: that stays eager
    sdpa = options.get("sdpa")

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        ab = alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with _autocast(device), _sdpa(sdpa):
            prediction = forward(x_t, t)
        loss = F.mse_loss(prediction.float(), noise)
        with _sdpa(sdpa):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            average()

    return net, step


def train_part(nets: Networks, args, device, peak: float | None) -> list[dict]:
    rows = []
    runs = [(v, args.batch) for v in args.train_variants]
    runs += [(args.sweep_variant, b) for b in args.sweep if b != args.batch]
    flops_per_sample = None
    for variant, batch in runs:
        impl, options = TRAIN_VARIANTS[variant]
        _reset_memory(device)
        try:
            _, step = _train_step(nets, impl, options, batch, device)
            if flops_per_sample is None:  # the same for every variant
                flops_per_sample = count_flops(step) / batch
            start = time.perf_counter()
            step()  # compiles, if asked
            _sync(device)
            first = time.perf_counter() - start
            seconds = _median_seconds(step, device, args.warmup, args.steps)
        except Exception as error:  # a backend this device lacks, out of memory, ...
            print(f"train | {variant} | batch {batch}: failed: {type(error).__name__}: {error}")
            rows.append({"part": "train", "variant": variant, "batch": batch, "error": str(error)})
            continue
        finally:
            step = None  # frees the network before the next variant
        row = {
            "part": "train",
            "variant": variant,
            "batch": batch,
            "ms": seconds * 1000,
            "samples_per_s": batch / seconds,
            "tflops": flops_per_sample * batch / seconds / 1e12,
            "mfu": mfu(flops_per_sample * batch, seconds, peak),
            "peak_gib": _peak_gib(device),
            "first_step_s": first,
        }
        rows.append(row)
        print(_line(row), flush=True)
    return rows


# --------------------------------------------------------------------------- sampling


def _sampler(impl: str, nets: Networks, options: dict, device, folder: Path, steps: int = 50):
    """A prompt -> image function (the image a CPU tensor in [0, 1]) for ``impl``."""
    scale = 7.5
    if impl == "diffusers":
        pipe = nets.diffusers_pipeline(device, folder)
        pipe.set_progress_bar_config(disable=True)
        if options["dtype"] == "bf16":
            pipe.to(device, torch.bfloat16)
        if options.get("compile"):
            pipe.unet.to(memory_format=torch.channels_last)  # diffusers' documented recipe
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        g = torch.Generator()  # on the host, as ours: the same starting noise

        def run():
            out = pipe(PROMPT, height=nets.image_size, width=nets.image_size,
                       num_inference_steps=steps, guidance_scale=scale,
                       generator=g.manual_seed(0), output_type="pt")  # fmt: skip
            return out.images.float().cpu()

        return run
    pipeline = nets.ours_pipeline(device)
    pipeline.to(device, dtype=options["dtype"])
    if options.get("channels_last"):
        for module in pipeline.modules():
            to_channels_last(module)
    compile_network(pipeline.denoiser, options.get("compile"))
    sampler = make_sampler("ddim", steps=steps)

    def run():
        images = pipeline.generate([PROMPT], sampler, guidance_scale=scale)
        return (images * 0.5 + 0.5).cpu()

    return run


def sample_part(nets: Networks, args, device, peak: float | None) -> list[dict]:
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="clip_tokenizer_"))
    flops, images = None, {}
    for variant in args.sample_variants:
        impl, options = SAMPLE_VARIANTS[variant]
        _reset_memory(device)
        try:
            run = _sampler(impl, nets, options, device, folder)
            if flops is None and impl == "ours":
                flops = count_flops(run)
            start = time.perf_counter()
            image = run()  # compiles, if asked
            first = time.perf_counter() - start
            images.setdefault((impl, options["dtype"]), image)
            seconds = _median_seconds(run, device, args.warmup, args.steps)
        except Exception as error:
            print(f"sample | {variant}: failed: {type(error).__name__}: {error}")
            rows.append({"part": "sample", "variant": variant, "error": str(error)})
            continue
        finally:
            run = None
        row = {
            "part": "sample",
            "variant": variant,
            "batch": 1,
            "ms": seconds * 1000,
            "samples_per_s": 1 / seconds,
            "tflops": flops / seconds / 1e12 if flops else None,
            "mfu": mfu(flops, seconds, peak) if flops else None,
            "peak_gib": _peak_gib(device),
            "first_step_s": first,
        }
        rows.append(row)
        print(_line(row), flush=True)
    for dtype in ("fp32", "bf16"):  # same weights, same starting noise: the same image
        if ("ours", dtype) in images and ("diffusers", dtype) in images:
            gap = (images["ours", dtype] - images["diffusers", dtype]).abs()
            rows.append({"part": "parity", "dtype": dtype, "max_abs": gap.max().item(),
                         "mean_abs": gap.mean().item()})  # fmt: skip
            print(f"ours vs diffusers, {dtype}: images differ by {gap.max():.4f} at most "
                  f"({gap.mean():.5f} on average) in [0, 1]")  # fmt: skip
    return rows


# --------------------------------------------------------------------------- FLOPs


def flops_part(nets: Networks, device) -> dict:
    """FLOPs per sample: a training step, one guided sampling step, a whole sample."""
    net = nets.ours_unet(device)
    size, width = nets.latent_size, nets.unet_config["context_dim"]
    x = torch.randn(2, 4, size, size, device=device)
    t, context = torch.full((2,), 500.0, device=device), torch.randn(2, 77, width, device=device)
    train = count_flops(lambda: net(x, t, context).square().mean().backward()) / 2
    with torch.no_grad():
        guided_step = count_flops(lambda: net(x, t, context))  # the CFG batch of one sample
    net = None
    pipeline = nets.ours_pipeline(device)
    whole = count_flops(
        lambda: pipeline.generate([PROMPT], make_sampler("ddim", steps=50), guidance_scale=7.5)
    )
    row = {"part": "flops", "train_step": train, "sampling_step": guided_step, "sample": whole}
    print(
        f"GFLOPs per sample: training step {train / 1e9:.1f}, guided sampling step "
        f"{guided_step / 1e9:.1f}, prompt to image (DDIM 50, CFG) {whole / 1e9:.1f}",
        flush=True,
    )
    return row


def _line(row: dict) -> str:
    cells = [
        row["part"],
        row["variant"],
        f"batch {row['batch']}",
        f"{row['ms']:.1f} ms",
        f"{row['samples_per_s']:.1f} samples/s",
        f"{row['tflops']:.3g} TFLOP/s" if row.get("tflops") else "",
        f"MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "",
        f"peak {row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else "",
        f"first call {row['first_step_s']:.1f} s",
    ]
    return " | ".join(c for c in cells if c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["flops", "train", "sample"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a quick check)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sweep", type=int, nargs="*", default=[8, 64])
    parser.add_argument("--sweep-variant", default="ours", choices=TRAIN_VARIANTS)
    parser.add_argument(
        "--train-variants", nargs="+", default=DEFAULT_TRAIN, choices=TRAIN_VARIANTS
    )
    parser.add_argument(
        "--sample-variants", nargs="+", default=DEFAULT_SAMPLE, choices=SAMPLE_VARIANTS
    )
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*non-meta parameter")  # --device meta
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = args.peak_tflops or peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, bf16 peak {peak} TFLOP/s", flush=True)
    nets = Networks(args.tiny)
    rows: list[dict] = []
    if "flops" in args.parts:
        rows.append(flops_part(nets, device))
    if "train" in args.parts:
        rows += train_part(nets, args, device, peak)
    if "sample" in args.parts:
        rows += sample_part(nets, args, device, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": name, "peak_tflops": peak}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
