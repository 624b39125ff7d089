"""``python -m ldm.tools.merge method=... inputs=[...] out=...``: merge checkpoints
(conf/merge.yaml; the methods are described in ldm.tools.merge)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldm.app import CONFIG_PATH, reported
from ldm.tools.merge import merge


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="merge")
@reported(ValueError, OSError)
def main(cfg: DictConfig) -> None:
    """Merge ``cfg.inputs`` by ``cfg.method`` into ``cfg.out``."""
    path = merge(
        cfg.method,
        list(cfg.inputs),
        cfg.out,
        weights=None if cfg.weights is None else list(cfg.weights),
        alpha=cfg.alpha,
        adapters=list(cfg.adapters),
    )
    print(f"wrote {path}")
