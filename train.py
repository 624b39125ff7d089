"""Train the autoencoder or the latent diffusion model (see conf/train.yaml).

python train.py experiment=shapes_vae
python train.py experiment=shapes_ldm vae_checkpoint=outputs/shapes_vae/checkpoints/last.ckpt
python train.py -m task.optimizer.lr=1e-4,3e-4 trainer.max_steps=2000
"""

from ldm.train import main

if __name__ == "__main__":
    main()
