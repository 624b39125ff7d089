"""``python -m ldm.study``: the sampler study on analytic data (conf/study.yaml).

The repository's ``study.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import reported
from ldm.app.study import study


@hydra.main(version_base="1.3", config_path="pkg://ldm.conf", config_name="study")
@reported
def main(cfg: DictConfig) -> None:
    study(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
