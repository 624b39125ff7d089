"""``python -m ldm.tools.curves``: see ldm.tools.curves (conf/curves.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.app import CONFIG_PATH, reported
from ldm.tools.curves import report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="curves")
@reported(ValueError)
def main(cfg: DictConfig) -> None:
    """Print the tables and write the plot that ``cfg`` asks for."""
    report(**OmegaConf.to_container(cfg, throw_on_missing=True))
