"""The latent cache: a dataset encoded once by a frozen VAE (and its captions by a frozen
text encoder), written as WebDataset shards, and read back instead of the images.

Each cached sample holds the VAE posterior's ``moments`` (mean and log-variance stacked on
the channel axis, as the encoder gives them), so training still draws a fresh latent
``mean + std * noise`` every step, as with live encoding. ``cache.json`` beside the shards
records the VAE config, the count, and latent statistics from which the latent scale
factor follows (1 / ``latent_std``). Augmentation is baked in: cache a dataset without
random flips or crops, or cache several passes of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ldm.data.builtin import check_split
from ldm.data.wds import ShardWriter, WebDatasetSource

ARRAYS = ("moments", "context", "pooled")  # what a cached sample may hold, as .npy
INFO = "cache.json"


def _npy(array: Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.numpy(), allow_pickle=False)
    return buffer.getvalue()


class _LatentStats:
    """Mean and standard deviation of z = mean + std * noise over every latent value (the
    scale factor that gives unit variance is 1 / latent_std), accumulated in float64."""

    def __init__(self):
        self.mean_sum = self.square_sum = self.variance_sum = 0.0
        self.values = 0

    def update(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        self.mean_sum += mean.double().sum().item()
        self.square_sum += mean.double().square().sum().item()
        self.variance_sum += variance.double().sum().item()
        self.values += mean.numel()

    def result(self) -> dict[str, float]:
        mean = self.mean_sum / self.values
        variance_of_means = self.square_sum / self.values - mean * mean
        std = math.sqrt(variance_of_means + self.variance_sum / self.values)
        return {"latent_mean": mean, "latent_std": std}


def _sample(
    batch: dict, i: int, moments: torch.Tensor, text: dict, dtype: torch.dtype
) -> dict[str, str | bytes]:
    """Sample ``i`` of a batch as shard files: its posterior moments, caption, label and
    (with a text encoder) context / pooled embedding."""
    sample = {
        "__key__": str(batch["key"][i]),
        "moments.npy": _npy(moments.to(dtype)),
        "txt": str(batch["caption"][i]).encode("utf-8"),
        "cls": str(int(batch["label"][i])).encode(),
    }
    for name in ("context", "pooled"):
        if name in text:
            sample[f"{name}.npy"] = _npy(text[name][i].detach().float().cpu().to(dtype))
    return sample


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    vae: nn.Module,
    out: str | Path,
    *,
    text_encoder: nn.Module | None = None,  # captions -> {"context", "pooled"} to store too
    batch_size: int = 64,
    shard_size: int = 1000,  # samples per shard
    dtype: torch.dtype = torch.float32,  # storage precision (float16 halves the size)
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    vae_source: str | None = None,  # where the VAE came from, recorded for training
) -> dict[str, Any]:
    """Encode every sample of ``dataset`` into ``out/latents-NNNNNN.tar`` + ``cache.json``.

    Written into a temporary folder and renamed when complete: ``out`` never holds a half
    cache. Returns the cache info (also in ``cache.json``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    vae = vae.eval().to(device)
    if text_encoder is not None:
        text_encoder = text_encoder.eval().to(device)
    writer, count, stats = ShardWriter(staging, "latents", shard_size), 0, _LatentStats()
    try:
        for batch in loader:
            posterior = vae.encode(batch["image"].to(device))  # a DiagonalGaussian
            stats.update(posterior.mean, posterior.var)
            moments = torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()
            text = text_encoder(list(batch["caption"])) if text_encoder is not None else {}
            for i in range(len(moments)):
                writer.write(_sample(batch, i, moments[i], text, dtype))
                count += 1
        writer.close()
        if count == 0:
            raise ValueError("the dataset is empty: nothing to cache")
        info = {
            "count": count,
            "shards": len(writer.paths),
            "dtype": str(dtype).removeprefix("torch."),
            "vae_config": getattr(vae, "config", None),
            "vae_source": vae_source,
            "vae_fingerprint": fingerprint(vae),
            "text_encoder": type(text_encoder).__name__ if text_encoder is not None else None,
            "fields": ["moments", *(f for f in ("context", "pooled") if f in text)],
            **stats.result(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / INFO).write_text(json.dumps(info, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return info


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, shapes, dtypes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_cache_info(root: str | Path) -> dict[str, Any]:
    path = Path(root) / INFO
    if not path.is_file():
        raise FileNotFoundError(
            f"no {INFO} in {root}: not a latent cache (make one with cache_latents)"
        )
    return json.loads(path.read_text())


class LatentShards(WebDatasetSource):
    """Samples of a latent cache: ``{"moments": (2C, h, w), "caption", "label", "key"}``
    plus ``context`` / ``pooled`` when the cache holds text encodings; float32."""

    def __init__(self, root: str | Path, **kwargs: Any):
        self.info = read_cache_info(root)
        shards = [str(Path(root) / f"latents-{i:06d}.tar") for i in range(self.info["shards"])]
        super().__init__(shards, **kwargs)

    def decode(self, item: Mapping[str, bytes]) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "caption": item["txt"].decode("utf-8"),
            "label": int(item["cls"].decode()),
            "key": item["__key__"],
        }
        for name in ARRAYS:
            if f"{name}.npy" in item:
                array = np.load(io.BytesIO(item[f"{name}.npy"]), allow_pickle=False)
                sample[name] = torch.from_numpy(array).float()
        return sample


class InMemoryLatents(Dataset):
    """A whole latent cache read into memory once: a map-style dataset (shuffled, sharded
    over ranks and resumed by the DataModule like the image sources) whose batches cost an
    index, not a tar read and an ``.npy`` decode per sample. For caches that fit in RAM
    (the 20,000 shapes latents of the tiny VAE: 41 MB)."""

    def __init__(self, root: str | Path):
        self.info = read_cache_info(root)
        samples = list(LatentShards(root, shuffle=False, rank=0, world_size=1))
        if len(samples) != self.info["count"]:
            raise ValueError(
                f"the latent cache {root} says {self.info['count']} samples but its shards "
                f"hold {len(samples)}: re-cache it"
            )
        self.arrays = {
            name: torch.stack([sample[name] for sample in samples])
            for name in ARRAYS
            if name in samples[0]
        }
        self.captions = [sample["caption"] for sample in samples]
        self.labels = [sample["label"] for sample in samples]
        self.keys = [sample["key"] for sample in samples]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            **{name: array[index] for name, array in self.arrays.items()},
            "caption": self.captions[index],
            "label": self.labels[index],
            "key": self.keys[index],
        }


def latent_cache(
    split: str = "train",
    *,
    root: str | Path,  # a folder holding one latent cache per split: {root}/{split}/
    in_memory: bool = False,  # read it all into RAM once (InMemoryLatents)
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    seed: int = 0,
) -> LatentShards | InMemoryLatents:
    """The cached latents of one split (a DataModule factory, like the image sources)."""
    check_split(split)
    if in_memory:
        return InMemoryLatents(Path(root) / split)
    train = split == "train"
    return LatentShards(
        Path(root) / split,
        shuffle=train,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled and train,
        samples_per_epoch=samples_per_epoch if train else None,
        seed=seed,
    )


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.latents import main

    main()
