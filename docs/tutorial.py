# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ldm in one notebook
#
# Train a tiny latent diffusion pipeline on the built-in `shapes` data, sample it with DDPM
# and DDIM, score FID against held-out images at several step counts, fine-tune a LoRA, and
# call the HTTP service — in three to five minutes on two CPU cores.
#
# The models are trained for a few hundred steps only, so the samples are blobs of roughly
# the right colour: the point is the workflow. `make quickstart` trains the same recipe
# long enough to draw recognisable shapes, and `make benchmark-shapes` trains it to FID 35
# (see the README).
#
# This notebook is `docs/tutorial.ipynb`; its source is `docs/tutorial.py` (jupytext). CI
# runs it top to bottom.

# %%
import base64
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from ldm.convert.lora import read_any
from ldm.diffusion.samplers import make_sampler
from ldm.nn.lora import load_adapter, set_adapter_weights
from ldm.pipeline import Pipeline

work = Path("tutorial_outputs").resolve()  # everything this notebook writes
work.mkdir(exist_ok=True)


def run(*args: str) -> None:
    """A command line of the framework, as from a shell (output shown on failure)."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])


def show(images: torch.Tensor, title: str, nrow: int = 4) -> None:
    """Images in [-1, 1] as one grid."""
    grid = make_grid(images * 0.5 + 0.5, nrow=nrow, padding=1).permute(1, 2, 0)
    plt.figure(figsize=(nrow, len(images) / nrow + 0.4))
    plt.imshow(grid.clamp(0, 1).numpy())
    plt.title(title)
    plt.axis("off")
    plt.show()


# %% [markdown]
# ## 1. Train the autoencoder, then the diffusion model
#
# Two command lines (`train.py`, or `python -m ldm.train` from anywhere). The first stage
# learns a VAE whose latents are 4x smaller than the 32 px images; the second trains the
# UNet and a small text encoder on those latents with classifier-free guidance dropout.

# %%
start = time.perf_counter()
run("-m", "ldm.train", "experiment=shapes_vae", "trainer.max_steps=150",
    "trainer.val_check_interval=150", f"hydra.run.dir={work}/vae")  # fmt: skip
vae = work / "vae" / "checkpoints" / "last.ckpt"
run("-m", "ldm.train", "experiment=shapes_ldm", f"vae_checkpoint={vae}",
    "trainer.max_steps=120", "trainer.val_check_interval=120", "data.batch_size=32",
    "callbacks.samples=null",
    f"hydra.run.dir={work}/ldm")  # fmt: skip
checkpoint = work / "ldm" / "checkpoints" / "last.ckpt"
print(f"trained in {time.perf_counter() - start:.0f} s: {checkpoint}")

# %% [markdown]
# ## 2. Sample: DDPM against DDIM
#
# A `Pipeline` holds everything generation needs; `generate` takes prompts, a sampler and
# one seed per image, so an image never depends on its batch.

# %%
pipeline = Pipeline.from_checkpoint(checkpoint)
prompts = ["a large red circle in the center on a white background"] * 2 + [
    "a small blue square in the top left on a black background"
] * 2
for name, steps in (("ddpm", 50), ("ddim", 20)):
    images = pipeline.generate(
        prompts, make_sampler(name, steps=steps), guidance_scale=3.0, seeds=[0, 1, 2, 3]
    )
    show(images, f"{name}, {steps} steps")

# %% [markdown]
# ## 3. FID against held-out images, by step count
#
# `evaluate.py` scores a grid of sampler settings against the held-out split, with the
# bundled InceptionV3. 32 samples give a very biased FID (compare only at equal n); real
# studies use 1,000 or more and several seeds (`repeats=`).

# %%
run("-m", "ldm.evaluate", f"checkpoint={checkpoint}", "num_samples=32", "attributes=false",
    "grid.steps=[5,20]", "grid.samplers=[{name:ddim,eta:[0.0,1.0]}]",
    f"hydra.run.dir={work}/eval")  # fmt: skip
rows = json.loads((work / "eval" / "results.json").read_text())["rows"]
for eta in (0.0, 1.0):
    points = sorted((r["steps"], r["fid"]) for r in rows if r["eta"] == eta)
    plt.plot(*zip(*points, strict=True), marker="o", label=f"DDIM, eta = {eta}")
plt.xlabel("steps")
plt.ylabel("FID (n = 32)")
plt.legend()
plt.show()

# %% [markdown]
# ## 4. A LoRA
#
# `lora=attn` freezes the model and trains low-rank adapters on the attention projections
# only; the run saves them alone as `adapter.safetensors`. Here: 20 steps at a high
# learning rate on the same data, just enough to see an adapter change the output (a real
# one learns a niche: a product line, a house style; docs/lora.md).

# %%
run("-m", "ldm.train", "experiment=shapes_ldm", f"base={checkpoint}", "lora=attn",
    "lora.rank=4", "task.optimizer.lr=1e-2", "trainer.max_steps=20", "data.batch_size=32",
    "callbacks.samples=null",
    "trainer.val_check_interval=30", f"hydra.run.dir={work}/lora")  # fmt: skip
adapter = next((work / "lora").rglob("adapter.safetensors"))
print(adapter)

# %%
networks = pipeline.networks()
tensors, settings = read_any(str(adapter), networks["denoiser"])
load_adapter(networks, tensors, "style", settings)
sampler = make_sampler("ddim", steps=20)
rows = []
for weight in (0.0, 0.5, 1.0):
    set_adapter_weights(networks, {"style": weight})
    rows.append(pipeline.generate(prompts[:2], sampler, guidance_scale=3.0, seeds=[0, 1]))
show(torch.cat(rows), "LoRA weight 0, 0.5, 1 (rows)", nrow=2)
print(f"mean pixel change at weight 1: {(rows[2] - rows[0]).abs().mean():.4f} (of 2)")

# %% [markdown]
# ## 5. The HTTP service
#
# `python -m ldm.serve` serves the checkpoint with dynamic batching; requests may name
# adapter files of `adapters_dir` with weights. Every response says which seed and
# settings made each image, and the `sample.py` line that makes it again.

# %%
with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
adapters_dir = work / "adapters"
adapters_dir.mkdir(exist_ok=True)
(adapters_dir / "style.safetensors").write_bytes(adapter.read_bytes())
server = subprocess.Popen(
    [sys.executable, "-m", "ldm.serve", f"checkpoint={checkpoint}",
     f"adapters_dir={adapters_dir}", f"port={port}"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)  # fmt: skip
try:
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    reply = httpx.post(
        f"{url}/v1/images",
        json={"prompt": prompts[0], "n": 2, "seed": 0, "steps": 20,
              "adapters": {"style.safetensors": 1.0}},
        timeout=120,
    ).json()  # fmt: skip
finally:
    server.terminate()
    server.wait()
print(json.dumps(reply["settings"]))
print(reply["images"][0]["sample_py"])
fig, axes = plt.subplots(1, 2, figsize=(3, 1.6))
for ax, image in zip(axes, reply["images"], strict=True):
    ax.imshow(plt.imread(io.BytesIO(base64.b64decode(image["png_base64"]))))
    ax.set_title(f"seed {image['seed']}")
    ax.axis("off")
plt.show()
