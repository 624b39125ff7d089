"""``python -m ldm.sample``: sample a trained model (conf/sample.yaml).

The repository's ``sample.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf), so an installed ldm runs from any folder."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import reported
from ldm.app.sample import sample


@hydra.main(version_base="1.3", config_path="pkg://ldm.conf", config_name="sample")
@reported  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    sample(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
