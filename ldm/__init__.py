"""ldm: a from-scratch latent diffusion research framework."""

__version__ = "0.1.0"
