"""``python -m ldm.data.prepare src=SRC out=OUT [key=value ...]``: an image folder into
WebDataset shards with fixed splits (conf/prepare.yaml; docs/prepare.md)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.app import CONFIG_PATH, reported
from ldm.data.prepare import MANIFEST, SETTINGS, prepare, summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
@reported(ValueError, OSError)
def main(cfg: DictConfig) -> None:
    """Prepare ``cfg.src`` into ``cfg.out`` with the remaining keys as settings."""
    settings = OmegaConf.to_container(cfg, throw_on_missing=True)
    src, out = settings.pop("src"), settings.pop("out")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown setting {', '.join(unknown)}; the settings are {', '.join(SETTINGS)} "
            "(conf/prepare.yaml describes them)"
        )
    manifest = prepare(src, out, **settings)
    print(summary(manifest))
    print(f"Wrote {Path(out).resolve() / MANIFEST}")
