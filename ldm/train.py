"""``python -m ldm.train``: train the autoencoder or the latent diffusion model (conf/train.yaml).

The repository's ``train.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf), so an installed ldm runs from any folder."""

from ldm.app.train import main

if __name__ == "__main__":
    main()
