"""Score a checkpoint against a held-out split over a sampler grid (see conf/evaluate.yaml).

python evaluate.py checkpoint=outputs/shapes_ldm/checkpoints/last.ckpt num_samples=1000
python evaluate.py checkpoint=... grid.sampler=[ddim,ddpm] grid.steps=[10,20,50,100,1000] \
    grid.eta=[0,0.5,1] repeats=3
python evaluate.py checkpoint=... fabric.devices=2 fabric.strategy=ddp   # same numbers
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import reported
from ldm.app.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@reported  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
