"""``python -m ldm.metrics.compare a=... b=...``: a folder of images against another folder
or against cached reference statistics (conf/compare.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm.app import CONFIG_PATH, reported
from ldm.io import atomic_write
from ldm.metrics.compare import compare
from ldm.metrics.extractors import make_extractor


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="compare")
@reported(ValueError)
def main(cfg: DictConfig) -> None:
    """Print (and with ``out``, write) the scores of ``b`` against ``a``."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    extractor = make_extractor(cfg.extractor).to("cpu" if device == "auto" else device)
    scores = compare(
        cfg.a,
        cfg.b,
        extractor,
        batch_size=cfg.batch_size,
        kid_subset_size=cfg.kid_subset_size,
        pr_k=cfg.precision_recall_k,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
    )
    text = json.dumps(scores, indent=2, default=str)
    print(text)
    if cfg.out:
        with atomic_write(Path(cfg.out)) as tmp:
            tmp.write_text(text + "\n")
