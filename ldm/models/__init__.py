"""Networks: VAE, UNet, conditioners, discriminator."""
