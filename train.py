"""Train the autoencoder or the latent diffusion model (see conf/train.yaml).

python train.py experiment=shapes_vae
python train.py experiment=shapes_ldm vae_checkpoint=outputs/shapes_vae/checkpoints/last.ckpt
python train.py -m task.optimizer.lr=1e-4,3e-4 trainer.max_steps=2000
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import reported
from ldm.app.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@reported  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
