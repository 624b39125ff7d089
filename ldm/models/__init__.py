"""Networks: VAE, denoiser backbones (UNet, DiT, MMDiT), conditioners, discriminator."""
