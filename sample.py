"""Sample a trained model (see conf/sample.yaml).

python sample.py checkpoint=outputs/shapes_ldm/checkpoints/last.ckpt prompts='["a red circle"]'
python sample.py checkpoint=... prompts_file=prompts.txt sampler=dpmpp_2m sampler.steps=25
python sample.py -m checkpoint=... guidance_scale=1,3,7 sampler=ddim,ddpm   # one folder each
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import reported
from ldm.app.sample import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@reported  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    sample(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
