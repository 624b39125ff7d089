"""UNet throughput on a CUDA device: SD 1.5 shape, 64 x 64 latents (512 x 512 images).

python benchmarks/unet_gpu.py [--batch 8] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from ldm.models.unet import UNet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = UNet().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 4, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    t = torch.rand(args.batch, device="cuda") * 999
    context = torch.randn(args.batch, 77, 768, device="cuda")
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for mode in ("inference", "training"):
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(13):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if mode == "inference":
                    with torch.no_grad():
                        model(x, t, context)
                else:
                    loss = model(x, t, context).float().square().mean()
            if mode == "training":
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        per_batch = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"{mode}: batch {args.batch}, bf16 autocast{', compiled' if args.compile else ''}: "
            f"{per_batch * 1000:.1f} ms/batch, {args.batch / per_batch:.1f} samples/s, "
            f"peak {peak:.1f} GiB"
        )


if __name__ == "__main__":
    main()
