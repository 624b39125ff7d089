"""A bounded load run against ``python -m ldm.serve``: ``--clients`` concurrent clients send
``--requests`` one-image requests in all, once with dynamic batching and once without
(``max_batch=1``); throughput and p50 / p95 / p99 latency of each.

    .venv/bin/python benchmarks/serve_load.py [--checkpoint CKPT] [--out serve_load.json]

Without ``--checkpoint`` a tiny model (model/backbone=unet_tiny, 32 px shapes, 2 training steps:
the speed is a trained one's, the images are not) is trained into a temporary folder.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a large blue square on a white background", "a small green triangle"]


def tiny_checkpoint(folder: Path) -> Path:
    run = folder / "tiny"
    subprocess.run(
        [sys.executable, "train.py", "task=ldm", "trainer.max_steps=2",
         "data.dataset.num_samples=[64,8,8]", f"hydra.run.dir={run}"],
        cwd=ROOT, check=True, capture_output=True, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, clients: int, requests: int, steps: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps}
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/images", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "requests_per_s": requests / wall,
        "p50_s": cuts[49],
        "p95_s": cuts[94],
        "p99_s": cuts[98],
        "wall_s": wall,
    }


def run(checkpoint: Path, batching: bool, args: argparse.Namespace) -> dict[str, float]:
    port = _port()
    command = [
        sys.executable, "-m", "ldm.serve", f"checkpoint={checkpoint}", f"port={port}",
        f"max_batch={args.max_batch if batching else 1}", "max_images=1",
        f"max_wait_ms={args.max_wait_ms}", f"max_queue={args.requests}",
    ]  # fmt: skip
    if args.threads:
        command.append(f"threads={args.threads}")
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        asyncio.run(_load(url, args.clients, args.clients, args.steps))  # warm-up
        result = asyncio.run(_load(url, args.clients, args.requests, args.steps))
        text = httpx.get(f"{url}/metrics").text
        sums = dict(
            line.split() for line in text.splitlines() if line.startswith("ldm_batch_images_")
        )
        result["mean_batch"] = float(sums["ldm_batch_images_sum"]) / float(
            sums["ldm_batch_images_count"]
        )
        return result
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: a tiny model trained now")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20)
    parser.add_argument("--threads", type=int, help="the server's torch threads")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(folder))
        results = {
            mode: run(checkpoint, mode == "batching", args) for mode in ("single", "batching")
        }
    print(
        f"{args.clients} clients, {args.requests} requests, DDIM {args.steps} steps, 1 image each\n"
    )
    print("| mode | requests/s | p50 s | p95 s | p99 s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
            f"{r['p99_s']:.3f} | {r['mean_batch']:.2f} |"
        )
    speedup = results["batching"]["requests_per_s"] / results["single"]["requests_per_s"]
    print(f"\nbatching: {speedup:.2f}x the throughput of one at a time")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"checkpoint": str(args.checkpoint)},
                    "results": results,
                    "speedup": speedup,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
