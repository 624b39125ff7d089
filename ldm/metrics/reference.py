"""Reference statistics of a held-out split: extracted once, cached with their provenance,
reused, and refused when they do not match what they would be compared against.

The provenance of a reference set is: the dataset's config, the split, the sample count,
the feature extractor (name, weights digest, resize), the uint8 conversion, and a SHA-256
of the very uint8 images. Its digest names the cache file, so a change to any of them (a
new extractor, another resize, edited images) computes anew instead of reusing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.io import read_safetensors, save_safetensors
from ldm.metrics.extractors import FeatureExtractor, to_uint8

CONVERSION = "uint8 = round((x + 1) * 127.5) of images in [-1, 1]"


def source_config(factory: Callable[..., Dataset]) -> dict[str, Any]:
    """A data module's dataset factory as a reference's provenance records it: its target
    and keyword arguments as plain values. evaluate.py and the FID callback both describe
    their split this way, so statistics cached by one are reused by the other."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    target = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
    kwargs = factory.keywords if isinstance(factory, functools.partial) else {}
    return {"_target_": target, **{k: _plain(v) for k, v in sorted(kwargs.items())}}


def _plain(value: Any) -> Any:
    """JSON-able: OmegaConf containers as lists / dicts, anything else unknown as repr."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process (in rank order) under torch.distributed, else ``[obj]``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _images(dataset: Dataset, indices: range | list[int]) -> Tensor:
    return to_uint8(torch.stack([dataset[i]["image"] for i in indices]))


def content_digest(dataset: Dataset, count: int, batch_size: int = 256) -> str:
    """SHA-256 of the first ``count`` samples' uint8 images, in order."""
    digest = hashlib.sha256()
    for start in range(0, count, batch_size):
        digest.update(
            _images(dataset, range(start, min(count, start + batch_size))).numpy().tobytes()
        )
    return digest.hexdigest()


def provenance(
    dataset_config: Mapping[str, Any],
    split: str,
    count: int,
    extractor: FeatureExtractor,
    content: str,
) -> dict[str, Any]:
    return {
        "dataset": dict(dataset_config),
        "split": split,
        "count": count,
        **extractor.provenance,
        "conversion": CONVERSION,
        "content_sha256": content,
    }


def provenance_key(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_reference(
    path: str | Path, expected: Mapping[str, Any] | None = None
) -> tuple[Tensor, dict]:
    """(features (N, D) in sample order, provenance) of a reference file; with ``expected``
    a provenance that differs is refused, naming every field that differs."""
    tensors, metadata = read_safetensors(path)
    stored = json.loads(metadata.get("provenance", "{}"))
    if expected is not None:
        keys = sorted(set(stored) | set(expected))
        differ = [
            f"{k}: {stored.get(k)!r} vs {expected.get(k)!r}"
            for k in keys
            if stored.get(k) != expected.get(k)
        ]
        if differ:
            raise ValueError(
                f"reference statistics {path} do not match this evaluation, refusing to compare: "
                + "; ".join(differ)
            )
    return tensors["features"], stored


def reference_features(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    dataset_config: Mapping[str, Any],
    split: str,
    count: int,
    cache_dir: str | Path,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, dict[str, Any], bool]:
    """The reference features of ``count`` samples of ``dataset``: (features in sample
    order, provenance, whether they were extracted now). Each rank extracts every
    ``world_size``-th sample; rank 0 writes the cache."""
    if count > len(dataset):
        raise ValueError(f"the {split} split has {len(dataset)} samples, fewer than count={count}")
    record = provenance(dataset_config, split, count, extractor, content_digest(dataset, count))
    path = Path(cache_dir) / f"reference-{provenance_key(record)}.safetensors"
    if path.is_file():
        features, _ = read_reference(path, record)
        return features, record, False
    mine = list(range(rank, count, world_size))
    parts = []
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            parts.append(extractor.features(_images(dataset, chunk).to(device)).double().cpu())
    local = (
        torch.cat(parts) if parts else torch.zeros(0, extractor.num_features, dtype=torch.float64),
        mine,
    )
    shares = all_gather_objects(local)
    features = torch.cat([f for f, _ in shares])
    order = torch.tensor([i for _, idx in shares for i in idx]).argsort()
    features = features[order].float()
    if rank == 0:
        save_safetensors(
            path, {"features": features}, {"provenance": json.dumps(record, default=str)}
        )
    return features, record, True
