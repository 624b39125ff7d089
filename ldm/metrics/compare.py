"""Scoring without a checkpoint: a folder of images against another folder, or against
reference statistics that ``evaluate.py`` (or the FID callback) cached.

    python -m ldm.metrics.compare a=real/ b=generated/ [extractor=...] [out=scores.json]
    python -m ldm.metrics.compare a=outputs/reference_stats/reference-<key>.safetensors b=generated/

``a`` is the reference side (FID's first set, precision's real manifold); images of any size
and format ``open_image`` reads, converted to uint8 once, as everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.data.folder import list_images
from ldm.data.images import open_image
from ldm.metrics.extractors import FeatureExtractor
from ldm.metrics.reference import read_reference
from ldm.metrics.scores import GenerativeMetrics


def _batches(paths: list[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of consecutive images of one size."""
    batch: list[Tensor] = []
    for path in paths:
        image = torch.from_numpy(np.asarray(open_image(path)).copy()).permute(2, 0, 1)
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def folder_features(
    folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50
) -> tuple[Tensor, list[Path]]:
    """Features (N, D) of every image under ``folder`` (sorted, recursive), and their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder of images at {folder}")
    paths = list_images(folder)
    if len(paths) < 2:
        raise ValueError(f"{folder} holds {len(paths)} image(s); scores need at least 2")
    device = next(extractor.parameters(), torch.zeros(())).device
    with torch.no_grad():
        parts = [
            extractor.features(b.to(device)).double().cpu() for b in _batches(paths, batch_size)
        ]
    return torch.cat(parts), paths


def side_features(
    source: str | Path, extractor: FeatureExtractor, batch_size: int = 50
) -> tuple[Tensor, dict[str, Any]]:
    """Features of a folder, or of a reference-statistics file made with the same network
    and resize (another is refused, naming both)."""
    source = Path(source)
    if source.is_file():
        features, stored = read_reference(source)
        mine = extractor.provenance
        differ = [k for k in mine if stored.get(k) != mine[k]]
        if differ:
            raise ValueError(
                f"{source} was made with another feature network or resize "
                f"({', '.join(f'{k}: {stored.get(k)!r} vs {mine[k]!r}' for k in differ)}); "
                "choose the extractor it was made with"
            )
        return features.double(), {"reference_file": str(source), "count": len(features)}
    features, paths = folder_features(source, extractor, batch_size)
    return features, {"folder": str(source), "count": len(paths)}


def compare(
    a: str | Path,
    b: str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
    kid_subset_size: int = 1000,
    pr_k: int | None = 3,
    bootstrap: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FID (FD), KID, precision / recall of ``b`` against ``a``, with what each side was."""
    real, about_a = side_features(a, extractor, batch_size)
    fake, about_b = side_features(b, extractor, batch_size)
    metrics = GenerativeMetrics(
        real, kid_subset_size=kid_subset_size, seed=seed, pr_k=pr_k, bootstrap=bootstrap
    )
    metrics.update(fake, torch.arange(len(fake)))
    return {"a": about_a, "b": about_b, **extractor.provenance, **metrics.compute()}


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.compare import main

    main()
