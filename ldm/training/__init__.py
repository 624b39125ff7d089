"""Training: LightningModules for the VAE and the latent diffusion model, callbacks, EMA."""
